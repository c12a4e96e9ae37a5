"""Real servers for remote splits, on 127.0.0.1 and free ports, stopped by their fixtures.

- `Nginx`: bench/servers.py's (Debian's nginx serving a directory, its access log read
  to count what was fetched); skips with the reason where there is no nginx binary
  (`apt-get install nginx-light` as root).
- `moto_s3`: moto's S3 server (`moto[server]`, in a thread), a bucket holding the
  digits splits under `data/digits/`.
Registered by conftest.py (`pytest_plugins`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import servers
from bench.servers import S3_ENV, free_port, wait_for_port
from tests.fixtures import copy_split


class Nginx(servers.Nginx):
    """bench/servers.py's nginx; the test skips with the reason where it cannot run."""

    def __init__(self, root: Path, work: Path):
        try:
            super().__init__(root, work)
        except servers.ServerUnavailable as err:
            pytest.skip(str(err))


@pytest.fixture(scope="session")
def served_root(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the servers serve: digits/ (train, val) and corrupt/train, a copy of digits'
    training split with one byte of its second shard changed (same size)."""
    root = tmp_path_factory.mktemp("served")
    for split in ("train", "val"):
        copy_split(digits_root / split, root / "digits" / split)
    corrupt = copy_split(digits_root / "train", root / "corrupt" / "train")
    shard = sorted(corrupt.glob("*.tar"))[1]
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    return root


@pytest.fixture(scope="session")
def nginx(served_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    server = Nginx(served_root, tmp_path_factory.mktemp("nginx"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto_s3(served_root: Path) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 holding s3://data/digits/{train,val}: its endpoint."""
    server_module = pytest.importorskip("moto.server", reason="needs moto[server] (test extra)")
    boto3 = pytest.importorskip("boto3", reason="needs boto3 (remote extra)")
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    port = free_port()
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_for_port(port)
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="data")
        for path in sorted((served_root / "digits").rglob("*")):
            if path.is_file():
                key = f"digits/{path.relative_to(served_root / 'digits')}"
                client.upload_file(str(path), "data", key)
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class BreakingServer:
    """A small HTTP server (the standard library's, in a thread) over `root` that breaks
    the first transfer of every file halfway (the full Content-Length promised, half
    sent, the connection closed) and honours `Range: bytes=N-` requests: what a flaky
    store does. Records each request as (path, range header)."""

    def __init__(self, root: Path):
        import http.server
        import threading

        self.requests: list[tuple[str, str | None]] = []
        broken: set[str] = set()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the standard library's name
                path = root / self.path.lstrip("/")
                ranged = self.headers.get("Range")
                server.requests.append((self.path, ranged))
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = int(ranged[len("bytes=") : -1]) if ranged else 0
                self.send_response(206 if ranged else 200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if self.path not in broken:
                    broken.add(self.path)
                    self.wfile.write(data[start : start + (len(data) - start) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def breaking_server(served_root: Path) -> Iterator[BreakingServer]:
    server = BreakingServer(served_root)
    yield server
    server.stop()
