"""Write samples into WebDataset tar shards plus their manifest.

Tars are written like webdataset's own ShardWriter (USTAR, members of a sample
in sorted extension order), but with fixed metadata so the same input gives the
same bytes, hence the same checksums, on every run.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from types import TracebackType

from ddp.shards.index import index_split
from ddp.shards.manifest import Manifest

SHARD_PATTERN = "shard-{:06d}.tar"


class ShardWriter:
    """Append samples ({ext: bytes}) to numbered shards of `shard_size` samples.

    `close()` (or leaving the `with` block) indexes the written tars into
    `manifest.json`, through the same code path as `ddp-shards index`. Existing
    *.tar files in `split_dir` are removed first: a split directory holds one
    split, and a stale shard would otherwise be indexed with the new ones.
    """

    def __init__(self, split_dir: str | os.PathLike, shard_size: int, meta: dict | None = None):
        if shard_size < 1:
            raise ValueError(f"shard_size={shard_size} must be >= 1")
        self.split_dir = Path(split_dir)
        self.shard_size = shard_size
        self.meta = dict(meta or {})
        self.paths: list[Path] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self.manifest: Manifest | None = None
        self.split_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.split_dir.glob("*.tar"):
            stale.unlink()

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if "." in key.rsplit("/", 1)[-1]:
            raise ValueError(f"key {key!r} must not contain a dot (webdataset splits there)")
        if self._tar is None or self._count == self.shard_size:
            self._open_next()
        assert self._tar is not None
        for ext in sorted(members):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1

    def _open_next(self) -> None:
        self._close_tar()
        path = self.split_dir / SHARD_PATTERN.format(len(self.paths))
        self.paths.append(path)
        self._tar = tarfile.open(path, mode="w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def _close_tar(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def close(self) -> Manifest:
        self._close_tar()
        if self.manifest is None:
            self.manifest = index_split(self.split_dir, self.paths, meta=self.meta)
        return self.manifest

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_tar()
