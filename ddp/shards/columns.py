"""Manifest v2's per-sample index: binary files beside manifest.json, read by memory map.

A split of a billion samples cannot hold its index in every process (as JSON it would
take ~250 GB of Python objects); mapped files cost nothing until a page is read, and
pages are shared by every process on the host. The files of one write (generation g)
are named in manifest.json, so a reader never mixes two writes:

- `manifest.g.members.EXT.npy`, int64 (N, 2): byte offset and size of sample i's
  `.EXT` member in its shard; −1, −1 where it has none;
- `manifest.g.labels.EXT.npy`, int64 (N,): the integer label in `.EXT` where it is one,
  `NO_LABEL` elsewhere (label columns only);
- `manifest.g.keys.txt`: the keys, one per line, in sample order (`sed -n 1001p` names
  sample 1000), and `manifest.g.keys.npy`, int64 (N + 1,): where each line starts.

All are standard .npy files (`np.load(path, mmap_mode="r")`). Keys are read only to
name a sample (errors, `ddp-shards order`, audits); an index without keys (a synthetic
one) names a sample by shard and position instead.
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

NO_LABEL = int(np.iinfo(np.int64).min)
"""A label column's value where the member is absent or not a plain integer."""

PREFIX = "manifest"
_GENERATION = re.compile(rf"^{PREFIX}\.(\d+)\.")


class IndexFileError(Exception):
    """A per-sample index file is missing or does not fit its manifest (message names it).
    The manifest turns it into a DataError."""


# --------------------------------------------------------------------------- keys


class Keys(Sequence[str]):
    """Sample keys by index, looked up one at a time or a shard's range at once."""

    def __len__(self) -> int:
        raise NotImplementedError

    def key(self, index: int) -> str:
        raise NotImplementedError

    def range(self, lo: int, hi: int) -> list[str]:
        """Keys of samples [lo, hi): a shard's keys, in one read."""
        return [self.key(i) for i in range(lo, hi)]

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        n = len(self)
        if isinstance(index, slice):
            lo, hi, step = index.indices(n)
            return self.range(lo, hi) if step == 1 else [self.key(i) for i in range(lo, hi, step)]
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"sample {index} is outside [0, {n})")
        return self.key(index)

    def __iter__(self) -> Iterator[str]:
        chunk = 1 << 16
        for lo in range(0, len(self), chunk):
            yield from self.range(lo, min(lo + chunk, len(self)))


class ListKeys(Keys):
    """Keys held as a list: a fresh index, or a v1 manifest (which held them anyway)."""

    def __init__(self, keys: list[str]):
        self._keys = keys

    def __len__(self) -> int:
        return len(self._keys)

    def key(self, index: int) -> str:
        return self._keys[index]

    def range(self, lo: int, hi: int) -> list[str]:
        return self._keys[lo:hi]


class FileKeys(Keys):
    """Keys in keys.txt, found by the line offsets in keys.npy: both mapped, so naming a
    sample reads two pages."""

    def __init__(self, text_path: Path, starts_path: Path, num_samples: int):
        self.paths = (text_path, starts_path, num_samples)
        self._starts = _load(starts_path, (num_samples + 1,))
        self._text = _map_bytes(text_path)
        if len(self._text) != int(self._starts[-1]):
            raise IndexFileError(
                f"{text_path}: {len(self._text):,} bytes, {starts_path.name} says "
                f"{int(self._starts[-1]):,}"
            )

    def __len__(self) -> int:
        return len(self._starts) - 1

    def key(self, index: int) -> str:
        lo, hi = int(self._starts[index]), int(self._starts[index + 1])
        return bytes(self._text[lo : hi - 1]).decode()

    def range(self, lo: int, hi: int) -> list[str]:
        if hi <= lo:
            return []
        begin, end = int(self._starts[lo]), int(self._starts[hi])
        return bytes(self._text[begin : end - 1]).decode().split("\n")

    def __reduce__(self) -> tuple[Any, ...]:
        return FileKeys, self.paths  # reopened by path: a pickle holds no keys


class PositionalKeys(Keys):
    """No keys recorded (a synthetic index): sample j of shard s is "NAME#j"."""

    def __init__(self, shard_names: list[str], shard_starts: np.ndarray):
        self.shard_names, self.shard_starts = shard_names, shard_starts

    def __len__(self) -> int:
        return int(self.shard_starts[-1])

    def key(self, index: int) -> str:
        shard = int(np.searchsorted(self.shard_starts, index, side="right")) - 1
        return f"{self.shard_names[shard]}#{index - int(self.shard_starts[shard])}"


# --------------------------------------------------------------------------- columns


@dataclass
class SampleColumns:
    """A split's per-sample arrays: in memory (a fresh index, a v1 manifest) or mapped
    from the files of one generation (a v2 manifest)."""

    members: dict[str, np.ndarray]
    """ext -> int64 (N, 2): offset and size of the member in its shard, −1 where absent."""
    labels: dict[str, np.ndarray]
    """ext -> int64 (N,): integer labels, NO_LABEL where not known."""
    keys: Keys
    files: tuple[Path, dict[str, Any]] | None = None
    """(split directory, manifest.json's "index" entry) when mapped from files."""

    def __reduce_ex__(self, protocol: Any) -> Any:
        if self.files is None:
            return super().__reduce_ex__(protocol)
        # Pickled (a spawned DataLoader worker) by path, not by content: O(1) bytes.
        return open_columns, (*self.files, len(self.keys), self.keys)


def generation_of(path: Path) -> int | None:
    match = _GENERATION.match(path.name)
    return int(match.group(1)) if match else None


def next_generation(split_dir: Path) -> int:
    """One past every generation with files in the directory (leftovers of a crash
    included), so a write never touches a file a reader may have open."""
    found = [g for p in split_dir.iterdir() if (g := generation_of(p)) is not None]
    return max(found, default=-1) + 1


def file_names(generation: int, exts: Sequence[str], label_exts: Sequence[str]) -> dict:
    """manifest.json's "index" entry: which file holds what."""
    stem = f"{PREFIX}.{generation}"
    return {
        "generation": generation,
        "members": {ext: f"{stem}.members.{ext}.npy" for ext in exts},
        "labels": {ext: f"{stem}.labels.{ext}.npy" for ext in label_exts},
        "keys": f"{stem}.keys.txt",
        "key_offsets": f"{stem}.keys.npy",
    }


def write_columns(split_dir: Path, columns: SampleColumns) -> dict[str, Any]:
    """Write a new generation of index files; return its "index" entry. Each file is
    written under a temporary name and renamed: no reader sees a partial one."""
    entry = file_names(next_generation(split_dir), sorted(columns.members), sorted(columns.labels))
    for ext, name in entry["members"].items():
        _save(split_dir / name, np.asarray(columns.members[ext], dtype=np.int64))
    for ext, name in entry["labels"].items():
        _save(split_dir / name, np.asarray(columns.labels[ext], dtype=np.int64))
    _write_keys(split_dir / entry["keys"], split_dir / entry["key_offsets"], columns.keys)
    return entry


def write_sparse_columns(
    split_dir: Path, num_samples: int, exts: Sequence[str], sample_bytes: int
) -> dict[str, Any]:
    """A synthetic generation: member columns of the right shape left as holes of a
    sparse file (no disk, zeros when read), no labels, no keys. For measuring set-up,
    order and seeks at any N; there are no tars to read."""
    entry = file_names(next_generation(split_dir), sorted(exts), [])
    del entry["keys"], entry["key_offsets"]
    entry["synthetic"] = {"sample_bytes": sample_bytes}
    for name in entry["members"].values():
        tmp = split_dir / f"{name}.tmp"
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(num_samples, 2))
        del array  # open_memmap extends the file with one byte at its end: the rest is a hole
        os.replace(tmp, split_dir / name)
    return entry


def open_columns(
    split_dir: Path, entry: dict[str, Any], num_samples: int, keys: Keys | None = None
) -> SampleColumns:
    """Map a generation's files (`keys`: how to name samples when it has no keys file).
    IndexFileError naming the file when one is missing or has the wrong shape."""
    members = {ext: _load(split_dir / n, (num_samples, 2)) for ext, n in entry["members"].items()}
    labels = {ext: _load(split_dir / n, (num_samples,)) for ext, n in entry["labels"].items()}
    if "keys" in entry:
        keys = FileKeys(split_dir / entry["keys"], split_dir / entry["key_offsets"], num_samples)
    elif keys is None:
        raise IndexFileError(f"{split_dir}: the index names no keys file")
    return SampleColumns(members, labels, keys, (split_dir, entry))


def remove_other_generations(split_dir: Path, keep: int) -> None:
    """Delete index files of older (or abandoned) writes; readers that mapped them keep
    their pages until they unmap."""
    for path in split_dir.iterdir():
        generation = generation_of(path)
        if generation is not None and generation != keep:
            path.unlink(missing_ok=True)


def _save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def _write_keys(text_path: Path, starts_path: Path, keys: Keys) -> None:
    """keys.txt (one key per line) and keys.npy (where each line starts)."""
    tmp = text_path.with_name(text_path.name + ".tmp")
    starts = np.zeros(len(keys) + 1, dtype=np.int64)
    with open(tmp, "wb") as f:
        for lo in range(0, len(keys), 1 << 16):
            chunk = [key.encode() for key in keys.range(lo, min(lo + (1 << 16), len(keys)))]
            f.write(b"".join(k + b"\n" for k in chunk))
            starts[lo + 1 : lo + 1 + len(chunk)] = [len(k) + 1 for k in chunk]
    np.cumsum(starts, out=starts)
    _save(starts_path, starts)
    os.replace(tmp, text_path)


def _load(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r" if np.prod(shape) else None, allow_pickle=False)
    except FileNotFoundError as err:
        raise IndexFileError(f"{path}: index file missing") from err
    except (ValueError, OSError) as err:
        raise IndexFileError(f"{path}: unreadable index file: {err}") from err
    if array.shape != shape or array.dtype != np.int64:
        raise IndexFileError(
            f"{path}: {array.dtype}{list(array.shape)} but the manifest needs int64{list(shape)}"
        )
    # A plain ndarray over the map: np.memmap's subclass hooks cost microseconds on every
    # operation of every micro-batch; the map lives as long as the view.
    return np.asarray(array)


def _map_bytes(path: Path) -> mmap.mmap | bytes:
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return b""
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError as err:
        raise IndexFileError(f"{path}: index file missing") from err
