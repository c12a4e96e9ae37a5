"""Real servers on 127.0.0.1 and free ports, for the remote-data tests and benchmarks alike
(tests/servers.py makes fixtures of them; bench/remote_bench.py runs them): nginx serving
a directory, and the environment moto's S3 server wants.

- `Nginx`: Debian's nginx serving a directory (static files: Range requests on), its
  access log read to count what was fetched; `ServerUnavailable` where there is no nginx
  binary (`apt-get install nginx-light` as root) or it does not start.
- `S3_ENV`: the credentials and region for moto's S3 server (`moto[server]`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


class ServerUnavailable(RuntimeError):
    """The server cannot run here; the message says why (a test skips with it)."""


NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen | None = None, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {within} s")


class Nginx:
    """nginx serving `root` at http://127.0.0.1:PORT/ until `stop()`; under /failing/ the
    same files, but every .tar answers 503."""

    def __init__(self, root: Path, work: Path):
        if NGINX is None:
            raise ServerUnavailable("no nginx binary (apt-get install nginx-light, as root)")
        self.root, self.work = root, work
        work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = work / "access.log"
        self.log.touch()
        temp = " ".join(
            f"{kind}_temp_path {work / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        user = "user root;" if os.geteuid() == 0 else ""
        (work / "nginx.conf").write_text(
            f"""{user}
worker_processes 1;
pid {work / "nginx.pid"};
error_log {work / "error.log"};
events {{ worker_connections 64; }}
http {{
    access_log {self.log};
    {temp}
    sendfile on;
    server {{
        listen 127.0.0.1:{self.port};
        root {root};
        location / {{ }}
        # /failing/...: the same files, but every shard answers 503 (a store in trouble)
        location ~ ^/failing/.*\\.tar$ {{ return 503; }}
        location /failing/ {{ alias {root}/; }}
    }}
}}
"""
        )
        self.process = subprocess.Popen(
            [NGINX, "-p", str(work), "-c", str(work / "nginx.conf"), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_for_port(self.port, self.process)
        except RuntimeError as err:
            self.stop()
            log = (work / "error.log").read_text()[-500:]
            raise ServerUnavailable(f"nginx did not start: {err}: {log}") from err

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self, suffix: str = "") -> list[str]:
        """Paths requested so far (GET), those ending in `suffix`."""
        paths = []
        for line in self.log.read_text().splitlines():
            parts = line.split('"')
            if len(parts) > 1 and parts[1].startswith("GET "):
                path = parts[1].split()[1]
                if path.endswith(suffix):
                    paths.append(path)
        return paths

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
