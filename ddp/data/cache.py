"""A bounded local cache of whole shards fetched from a remote split, shared by the
processes of a node.

A remote split (`http(s)://host/path/split`, `s3://bucket/prefix/split`) is read by the
very offset code of a local one: its `manifest.json` and index files are fetched into
`cache_dir/<scheme>/<host>/<path>/`, and each shard is fetched whole into the same
directory when first needed, then memory-mapped as a local shard is. So the epoch
order, coverage, equal counts and O(1) resume are those of the local split.

Guarantees, and how:

- **Never a partial or wrong shard.** A shard is written to `NAME.part` and renamed to
  `NAME` only after its size and sha256 match the manifest; `NAME.ok` beside it holds
  the checksum it was verified against. A restart reuses a shard when `NAME.ok` names
  the manifest's sha256 and the size matches (no re-hash: the name only ever appears
  after a verified download). A mismatch is a DataError naming the URL and both
  checksums; the bytes are deleted, never read.
- **One download per node.** Each shard has a lock file (`NAME.lock`, fcntl.flock): the
  process holding it exclusively downloads, the others wait and then reuse the file.
  A process reading a shard holds a shared lock on it (a *pin*) for as long as it
  keeps it mapped.
- **Bounded.** Before a download, under a cache-wide lock, room is made: the least
  recently used shards (by mtime, touched on each use) that no process pins are
  removed until the shards, the downloads in flight (`.part` files, created at full
  size) and the new one fit in `max_bytes`. Shards pinned by running processes are
  never removed; when nothing can go, the download waits for pins to drop, up to the
  timeout, then a DataError says the cache is too small. (On Linux a mapped file may be
  unlinked safely, its pages stay readable, but its blocks are freed only at unmap:
  hence pins rather than relying on that.) Index files and manifests are not counted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ddp.data.remote import Remote, join
from ddp.errors import DataError
from ddp.shards.columns import remove_other_generations
from ddp.shards.manifest import MANIFEST_NAME, Manifest, read_manifest

GB = 1 << 30
PART, OK, LOCK, DOWNLOAD = ".part", ".ok", ".lock", ".download"
CACHE_LOCK = ".cache.lock"
MAX_PINNED = 256
"""Shards one process keeps mapped at most (a quarter of the cache bound, in shards, if
less): an fd and a map each. A fully random order touches every shard in each epoch's
first batches, so fewer means remapping (and re-pinning) shards batch after batch."""


_held: set[int] = set()
"""Lock fds open in this process. flock belongs to the open file description, which a
fork shares: a DataLoader worker forked while a thread downloads would keep that
download's lock held after the parent let go, and wait on it forever. So a forked child
closes (never unlocks: the parent still holds them) every lock fd it inherited."""
_held_guard = threading.Lock()


def open_lock(path: Path) -> int:
    with _held_guard:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        _held.add(fd)
    return fd


def close_lock(fd: int) -> None:
    with _held_guard:
        _held.discard(fd)
        os.close(fd)


def _close_inherited_locks() -> None:
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


def _release_guard() -> None:
    _held_guard.release()


def _child_after_fork() -> None:
    _close_inherited_locks()
    _held_guard.release()


os.register_at_fork(
    before=_held_guard.acquire, after_in_parent=_release_guard, after_in_child=_child_after_fork
)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ddp" / "shards"


@contextlib.contextmanager
def locked(path: Path, how: int = fcntl.LOCK_EX) -> Iterator[int]:
    """Hold an flock on `path` (created if needed) for the block; yields the fd."""
    fd = open_lock(path)
    try:
        fcntl.flock(fd, how)
        yield fd
    finally:
        close_lock(fd)


@dataclass
class ShardCache:
    """The cache directory (see the module docstring): where shards land, its bound."""

    root: Path
    max_bytes: int
    remote: Remote
    downloads: int = 0
    """Shards this process downloaded (not those it found in the cache)."""

    @property
    def max_gb(self) -> float:
        """The bound as data.remote.cache_max_gb gave it (not its rounding to bytes)."""
        return round(self.max_bytes / GB, 6)

    def split_dir(self, url: str) -> Path:
        """Where a remote split's files live in the cache: scheme/host/path."""
        parsed = urlparse(url)
        host = parsed.netloc.replace(":", "_") or "_"
        parts = [p for p in parsed.path.split("/") if p not in ("", ".", "..")]
        return self.root.joinpath(parsed.scheme, host, *parts)

    # -- shards ---------------------------------------------------------------

    def fetch(self, url: str, path: Path, size: int, sha256: str) -> Path:
        """`path` holding the verified shard, downloaded from `url` unless already here."""
        self.pin(url, path, size, sha256, keep=False)
        return path

    def pin(self, url: str, path: Path, size: int, sha256: str, keep: bool = True) -> int | None:
        """Make `path` the verified shard and hold a shared lock on it (returned fd, to
        `unpin`; none with keep=False), so no process evicts it meanwhile."""
        lock = path.with_name(path.name + LOCK)
        try:
            fd = open_lock(lock)
        except FileNotFoundError:  # the shard's first fetch into a new directory
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = open_lock(lock)
        try:
            while True:
                fcntl.flock(fd, fcntl.LOCK_SH)
                if _ready(path, size, sha256):
                    now = time.time_ns()  # the kernel's own stamp ticks every few ms:
                    os.utime(path, ns=(now, now))  # most recently used, in this order
                    break
                fcntl.flock(fd, fcntl.LOCK_UN)
                # Downloads take a lock of their own: one waiting to download never
                # waits on the readers that pin the shard once it is there.
                with locked(path.with_name(path.name + DOWNLOAD)):
                    if not _ready(path, size, sha256):
                        self._download(url, path, size, sha256)
                # loop: pin it (an evictor may have taken it in between: fetch again)
        except BaseException:
            close_lock(fd)
            raise
        if keep:
            return fd
        close_lock(fd)
        return None

    @staticmethod
    def unpin(fd: int) -> None:
        close_lock(fd)

    def _download(self, url: str, path: Path, size: int, sha256: str) -> None:
        part = path.with_name(path.name + PART)
        marker = path.with_name(path.name + OK)
        for stale in (marker, path):  # another manifest's shard, or a truncated one:
            stale.unlink(missing_ok=True)  # gone before the new one is counted
        self._make_room(size, part, url)
        digest = hashlib.sha256()

        def on_bytes(chunk: bytes) -> None:
            nonlocal digest
            if not chunk:
                digest = hashlib.sha256()
            digest.update(chunk)

        try:
            with open(part, "r+b") as out:
                got = self.remote.download(url, out, on_bytes, limit=size)
            actual = digest.hexdigest()
            if got != size:
                raise DataError(
                    f"{url}: {got:,}{'+' if got > size else ''} bytes but the manifest says "
                    f"{size:,} (the shard changed since it was indexed; not used)"
                )
            if actual != sha256:
                raise DataError(
                    f"{url}: sha256 {actual} but the manifest says {sha256} (corrupt or "
                    "changed since it was indexed; not used)"
                )
            marker_tmp = marker.with_name(marker.name + PART)
            marker_tmp.write_text(sha256)
            # The marker first: a crash between the two leaves a marker without a shard
            # (not ready, replaced next time), never a shard the bound does not count.
            with locked(self.root / CACHE_LOCK):  # not while an evictor scans
                os.replace(marker_tmp, marker)
                os.replace(part, path)
            self.downloads += 1
        finally:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()

    # -- the bound ------------------------------------------------------------

    def _make_room(self, size: int, part: Path, url: str) -> None:
        """Evict unpinned shards, least recently used first, until `size` more bytes fit;
        then create `part` at that size (a reservation the next evictor counts)."""
        if size > self.max_bytes:
            raise DataError(
                f"{url}: a {size:,}-byte shard does not fit in "
                f"data.remote.cache_max_gb={self.max_gb:g}"
            )
        deadline = time.monotonic() + self.remote.timeout_s
        self.root.mkdir(parents=True, exist_ok=True)
        while True:
            with locked(self.root / CACHE_LOCK):
                shards, used = _scan(self.root)
                for _, shard_size, shard in sorted(shards):
                    if used + size <= self.max_bytes:
                        break
                    if _evict(shard):
                        used -= shard_size
                if used + size <= self.max_bytes:
                    with open(part, "wb") as f:
                        f.truncate(size)
                    return
            if time.monotonic() > deadline:
                raise DataError(
                    f"{self.root}: data.remote.cache_max_gb={self.max_gb:g} is too small: "
                    f"{used:,} bytes are pinned by running processes and {size:,} more are "
                    "needed (raise it, or lower data.remote.prefetch_shards / "
                    "data.loader.num_workers)"
                )
            time.sleep(0.1)

    def used_bytes(self) -> int:
        """Bytes the cache holds now: verified shards and downloads in flight."""
        return _scan(self.root)[1] if self.root.is_dir() else 0


def _ready(path: Path, size: int, sha256: str) -> bool:
    try:
        marker = path.with_name(path.name + OK).read_text()
        return marker == sha256 and path.stat().st_size == size
    except (FileNotFoundError, NotADirectoryError):
        return False


def _scan(root: Path) -> tuple[list[tuple[float, int, Path]], int]:
    """(mtime, size, path) of each cached shard, and the bytes of shards + .part files."""
    shards, used = [], 0
    for directory, _, files in os.walk(root):
        for name in files:
            path = Path(directory, name)
            try:
                if name.endswith(PART) and not name.endswith(OK + PART):
                    if _abandoned(path):
                        continue
                    used += path.stat().st_size
                elif name.endswith(OK):
                    shard = path.with_name(name[: -len(OK)])
                    st = shard.stat()
                    shards.append((st.st_mtime, st.st_size, shard))
                    used += st.st_size
            except FileNotFoundError:
                continue
    return shards, used


def _abandoned(part: Path) -> bool:
    """Remove a download no process is making (its process died); True if removed."""
    lock = part.with_name(part.name[: -len(PART)] + DOWNLOAD)
    if not lock.exists():
        return False  # not a shard's download (a manifest's, an index file's)
    fd = open_lock(lock)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        part.unlink(missing_ok=True)
        return True
    finally:
        close_lock(fd)


def _evict(shard: Path) -> bool:
    """Remove a shard nobody pins (the shard first: a crash in between leaves a marker
    without a shard, which is never ready, rather than a shard the bound ignores)."""
    fd = open_lock(shard.with_name(shard.name + LOCK))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # pinned, or being downloaded
        for path in (shard, shard.with_name(shard.name + OK)):
            path.unlink(missing_ok=True)
        return True
    finally:
        close_lock(fd)


# --------------------------------------------------------------------------- splits


@dataclass
class RemoteSplit:
    """A remote split's shards, fetched into the cache when a reader asks for them."""

    url: str
    local_dir: Path
    names: list[str]
    sizes: list[int]
    sha256: list[str]
    cache: ShardCache
    max_pinned: int = 2
    """Shards one process keeps mapped (and pinned) at once."""
    prefetch_shards: int = 4
    """Shards the training loader fetches ahead of the order's needs."""

    def shard_url(self, shard: int) -> str:
        return join(self.url, self.names[shard])

    def path(self, shard: int) -> Path:
        return self.local_dir / self.names[shard]

    def fetch(self, shard: int) -> Path:
        return self.cache.fetch(
            self.shard_url(shard), self.path(shard), self.sizes[shard], self.sha256[shard]
        )

    def unpin(self, fd: int) -> None:
        self.cache.unpin(fd)

    def pin(self, shard: int) -> int:
        fd = self.cache.pin(
            self.shard_url(shard), self.path(shard), self.sizes[shard], self.sha256[shard]
        )
        assert fd is not None
        return fd


def open_remote_split(
    url: str, cache: ShardCache, prefetch_shards: int = 4
) -> tuple[Path, Manifest, RemoteSplit]:
    """Fetch the split's manifest.json (always: it says what the shards are) and its
    index files (when missing, or when the manifest changed) into the cache; read it
    as a local manifest. DataError naming the URL when it cannot be had or read."""
    local = cache.split_dir(url)
    local.mkdir(parents=True, exist_ok=True)
    with locked(local / (MANIFEST_NAME + LOCK)):
        manifest_url = join(url, MANIFEST_NAME)
        raw = cache.remote.read(manifest_url)
        try:
            data = json.loads(raw)
            entry = data.get("index") if data.get("version") == 2 else None
            files = _index_files(entry) if entry else []
        except (ValueError, AttributeError, TypeError) as err:
            raise DataError(f"{manifest_url}: unreadable manifest: {err}") from None
        old = local / MANIFEST_NAME
        changed = not old.is_file() or old.read_bytes() != raw
        for name in files:
            target = local / name
            if changed or not target.is_file():
                tmp = target.with_name(target.name + PART)
                tmp.write_bytes(cache.remote.read(join(url, name)))
                os.replace(tmp, target)
        tmp = old.with_name(old.name + PART)
        tmp.write_bytes(raw)
        os.replace(tmp, old)
        if entry and changed:
            remove_other_generations(local, entry["generation"])
    manifest = read_manifest(local)
    table = manifest.table
    largest = max(int(table.sizes.max()) if len(table) else 1, 1)
    max_pinned = max(1, min(MAX_PINNED, cache.max_bytes // (4 * largest)))
    # Shards fetched ahead must fit beside those being read, in each process of the node:
    # one fetched beyond that would evict a shard still needed, to be fetched again.
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    room = cache.max_bytes // largest // max(1, local_processes) - max_pinned - 1
    split = RemoteSplit(
        url,
        local,
        table.names,
        table.sizes.tolist(),
        table.sha256,
        cache,
        max_pinned=max_pinned,
        prefetch_shards=max(0, min(prefetch_shards, room)),
    )
    return local, manifest, split


def _index_files(entry: dict[str, Any]) -> list[str]:
    names = [*entry.get("members", {}).values(), *entry.get("labels", {}).values()]
    names += [entry[k] for k in ("keys", "key_offsets") if k in entry]
    for name in names:
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            raise ValueError(f"bad index file name {name!r}")
    return names
