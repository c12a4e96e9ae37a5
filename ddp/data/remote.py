"""Bytes from shards that live elsewhere: `http(s)://host/path` and `s3://bucket/key`.

One call, `Remote.download(url, dest, offset=...)`, streams an object (or its tail,
by an HTTP Range / S3 Range request) into an open file. A failure that another try may
cure (a refused connection, a reset, a 5xx, a timeout) is retried with exponential
backoff until `timeout_s` has passed since the first try; then, or at once for an
answer no retry changes (404, 403), a `DataError` in one line naming the URL. HTTP goes
through the standard library; S3 through boto3 (the `remote` extra), with the endpoint
from `s3_endpoint` or the standard AWS_ENDPOINT_URL and credentials from the standard
AWS variables, so any S3-compatible store works.
"""

from __future__ import annotations

import http.client
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO
from urllib.parse import urlparse

from ddp.errors import DataError

SCHEMES = ("http", "https", "s3")
CHUNK = 1 << 20


def is_remote(location: str) -> bool:
    """A location the remote loader reads: http://, https:// or s3://."""
    return urlparse(str(location)).scheme in SCHEMES


def join(location: str, name: str) -> str:
    """`name` beside (under) a location: a URL joined with `/`, or a path. A name that is
    itself a URL or an absolute path stands alone (a split given in full)."""
    if is_remote(name) or name.startswith("/"):
        return name
    if is_remote(location):
        return location.rstrip("/") + "/" + name.lstrip("/")
    return os.path.join(location, name)


class Retry(Exception):
    """A failure another try may cure."""


@dataclass
class Remote:
    """Fetches objects by URL with retries up to `timeout_s` (see the module docstring)."""

    timeout_s: float = 60.0
    s3_endpoint: str | None = None
    requests: int = 0
    """Requests made by this process (each try counts): what tests and benchmarks read."""
    bytes_fetched: int = 0
    _s3: Any = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_s3": None}  # a boto3 client is made again per process

    def read(self, url: str) -> bytes:
        """A small object whole (a manifest, an index file)."""
        chunks: list[bytes] = []

        def attempt() -> None:
            chunks.clear()  # a broken try's bytes are not kept: each try reads it whole
            self._stream(url, 0, chunks.append, lambda: None)

        self._retrying(url, attempt)
        return b"".join(chunks)

    def download(
        self, url: str, out: BinaryIO, on_bytes: Callable[[bytes], None], limit: int
    ) -> int:
        """Write the object into `out` from its current position on, resuming with a Range
        request after a broken transfer; `on_bytes` sees every byte written, in order.
        Stops past `limit` bytes (a longer object is wrong: the caller names it).
        Returns the bytes written."""
        start = out.tell()
        written = [0]

        def sink(chunk: bytes) -> None:
            out.write(chunk)
            on_bytes(chunk)
            written[0] += len(chunk)
            if written[0] > limit:
                raise _TooLong

        def restart() -> None:  # the server ignored the Range: start over
            raise _Restart

        while True:
            try:
                self._retrying(url, lambda: self._stream(url, written[0], sink, restart))
                return written[0]
            except _TooLong:
                return written[0]
            except _Restart:
                out.seek(start)
                out.truncate()
                written[0] = 0
                on_bytes(b"")  # the caller resets its hash on an empty chunk

    # -- tries -----------------------------------------------------------------

    def _retrying(self, url: str, attempt: Callable[[], None]) -> None:
        deadline = time.monotonic() + self.timeout_s
        delay = 0.1
        while True:
            self.requests += 1
            try:
                attempt()
                return
            except Retry as err:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DataError(
                        f"{url}: unreachable for {self.timeout_s:g} s "
                        f"(data.remote.timeout_s; last error: {err})"
                    ) from None
                time.sleep(min(delay, left))
                delay = min(delay * 2, 5.0)

    def _stream(
        self, url: str, offset: int, sink: Callable[[bytes], None], restart: Callable[[], None]
    ) -> None:
        if urlparse(url).scheme == "s3":
            self._stream_s3(url, offset, sink)
        else:
            self._stream_http(url, offset, sink, restart)

    def _stream_http(
        self, url: str, offset: int, sink: Callable[[bytes], None], restart: Callable[[], None]
    ) -> None:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        request = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=min(self.timeout_s, 30)) as response:
                if offset and response.status != 206:
                    restart()
                promised = response.getheader("Content-Length")
                got = 0
                while chunk := response.read(CHUNK):
                    self.bytes_fetched += len(chunk)
                    got += len(chunk)
                    sink(chunk)
                if promised is not None and got < int(promised):  # closed early
                    raise Retry(f"the connection closed after {got:,} of {int(promised):,} bytes")
        except urllib.error.HTTPError as err:
            if err.code >= 500 or err.code in (408, 429):
                raise Retry(f"HTTP {err.code}") from None
            raise DataError(f"{url}: HTTP {err.code} {err.reason}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            raise Retry(_describe(err)) from None

    def _stream_s3(self, url: str, offset: int, sink: Callable[[bytes], None]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        parsed = urlparse(url)
        bucket, key = parsed.netloc, parsed.path.lstrip("/")
        options = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            body = self._client().get_object(Bucket=bucket, Key=key, **options)["Body"]
            while chunk := body.read(CHUNK):
                self.bytes_fetched += len(chunk)
                sink(chunk)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "?")
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status >= 500 or code in ("SlowDown", "RequestTimeout", "InternalError"):
                raise Retry(f"S3 {code}") from None
            raise DataError(f"{url}: S3 {code}") from None
        except (BotoCoreError, OSError) as err:
            raise Retry(_describe(err)) from None

    def _client(self) -> Any:
        if self._s3 is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError as err:
                raise DataError(
                    "s3:// data needs boto3: pip install 'ddp[remote]' (or boto3)"
                ) from err
            endpoint = self.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
            timeout = min(self.timeout_s, 30)
            config = Config(
                retries={"max_attempts": 1},  # the retries are ours, bounded by timeout_s
                connect_timeout=timeout,
                read_timeout=timeout,
            )
            self._s3 = boto3.client("s3", endpoint_url=endpoint, config=config)
        return self._s3


class _TooLong(Exception):
    pass


class _Restart(Exception):
    pass


def _describe(err: BaseException) -> str:
    if isinstance(err, urllib.error.URLError) and not isinstance(err.reason, str):
        err = err.reason  # type: ignore[assignment]
    if isinstance(err, socket.timeout | TimeoutError):
        return "timed out"
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
