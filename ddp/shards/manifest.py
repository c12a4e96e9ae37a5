"""The manifest: what a split directory of tar shards holds, and where.

`manifest.json` sits beside the shards of one split. Version 2 keeps it small: per
shard (as columns) the name, byte size, sample count, sha256 and label range, plus the
split's metadata and the names of the per-sample index files (`ddp.shards.columns`):
member offsets and sizes per extension, labels, keys, read by memory map. So a process
pays for the shards at start-up and for the pages of the samples it reads, not for N.

Version 1 (everything in the JSON, per sample) is still read, into memory as before;
`ddp-shards index` writes version 2 (and says so when it replaces a version 1).
Shards stay plain WebDataset tars; the manifest is an index beside them, never a
replacement.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

from ddp.errors import DataError
from ddp.shards.columns import (
    NO_LABEL,
    IndexFileError,
    Keys,
    ListKeys,
    PositionalKeys,
    SampleColumns,
    open_columns,
    remove_other_generations,
    write_columns,
)

MANIFEST_NAME = "manifest.json"
FORMAT = "ddp-shards"
VERSION = 2


@dataclass
class ShardInfo:
    """One tar shard and the index of its samples, all in memory: what the indexer
    produces and `verify` compares, one shard at a time."""

    name: str
    """File name relative to the split directory."""
    size: int
    """Byte size of the tar file."""
    sha256: str
    keys: list[str]
    """Sample keys in tar order."""
    members: dict[str, dict[str, list[int]]]
    """ext -> {"offsets": [...], "sizes": [...]}, one entry per sample; -1 where a
    sample has no member with that extension."""
    label_ranges: dict[str, list[int]] = field(default_factory=dict)
    """ext -> [smallest, largest] integer label of a label column (cls, ...), recorded by
    the indexer so a start-up can check them against the model's classes."""
    labels: dict[str, list[int]] = field(default_factory=dict)
    """ext -> the integer label of every sample (NO_LABEL where absent or not an
    integer), for label columns; empty when not known (an upgraded v1 manifest)."""

    @property
    def num_samples(self) -> int:
        return len(self.keys)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardInfo:
        """One shard of a version 1 manifest."""
        shard = cls(
            data["name"],
            int(data["size"]),
            data["sha256"],
            list(data["keys"]),
            {
                ext: {"offsets": list(col["offsets"]), "sizes": list(col["sizes"])}
                for ext, col in data["members"].items()
            },
            {ext: list(r) for ext, r in data.get("label_ranges", {}).items()},
        )
        if data.get("num_samples", shard.num_samples) != shard.num_samples:
            raise ValueError(f"shard {shard.name}: num_samples does not match its keys")
        for ext, col in shard.members.items():
            if len(col["offsets"]) != shard.num_samples or len(col["sizes"]) != shard.num_samples:
                raise ValueError(f"shard {shard.name}: column .{ext} has the wrong length")
        return shard


@dataclass
class ShardTable:
    """Everything per shard, as columns: O(shards) memory, whatever N."""

    names: list[str]
    sizes: np.ndarray
    """int64 byte size of each tar."""
    counts: np.ndarray
    """int64 samples in each shard."""
    sha256: list[str]
    label_ranges: dict[str, np.ndarray] = field(default_factory=dict)
    """ext -> int64 (shards, 2): [smallest, largest] label; NO_LABEL rows where none
    was recorded (labels that are not integers, or a manifest from before ranges)."""
    member_counts: dict[str, np.ndarray] = field(default_factory=dict)
    """ext -> int64 per shard: how many of its samples have a .ext member. Empty in a
    manifest written before the counts: then the loader reads the columns to find out."""
    starts: np.ndarray = field(init=False)
    """int64 (shards + 1,): index of each shard's first sample; starts[-1] is N."""
    stride: int = field(init=False)
    """The sample count of every shard but the last when they all hold that many and
    the last no more (as writers make them), else 0."""

    def __post_init__(self) -> None:
        self.starts = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])
        first = int(self.counts[0]) if len(self.counts) else 0
        uniform = first > 0 and (self.counts[:-1] == first).all() and self.counts[-1] <= first
        self.stride = first if uniform else 0

    def __len__(self) -> int:
        return len(self.names)

    @property
    def num_samples(self) -> int:
        return int(self.starts[-1])

    def shard_of(self, indices: np.ndarray) -> np.ndarray:
        """The shard (position in `names`) of each sample index: a division when the
        shards are of one size (but the last), else a binary search over the shard
        starts; never an array per sample."""
        if self.stride:  # index < N <= shards × stride: the quotient is a shard
            return np.asarray(indices) // self.stride
        return np.searchsorted(self.starts, indices, side="right") - 1

    def to_json(self) -> dict[str, Any]:
        return {
            "names": self.names,
            "sizes": self.sizes.tolist(),
            "num_samples": self.counts.tolist(),
            "sha256": self.sha256,
            "label_ranges": {
                ext: {side: _nullable(r[:, i]) for i, side in enumerate(("low", "high"))}
                for ext, r in self.label_ranges.items()
            },
            "member_counts": {ext: c.tolist() for ext, c in self.member_counts.items()},
        }

    def covered(self, exts: Sequence[str]) -> np.ndarray | None:
        """bool per shard: every sample of the shard has a member of one of `exts`, by the
        member counts (one extension present in all of them); None without counts."""
        if not all(ext in self.member_counts for ext in exts):
            return None
        full = np.zeros(len(self), dtype=bool)
        for ext in exts:
            full |= self.member_counts[ext] == self.counts
        return full

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardTable:
        table = cls(
            list(data["names"]),
            np.asarray(data["sizes"], dtype=np.int64),
            np.asarray(data["num_samples"], dtype=np.int64),
            list(data["sha256"]),
            {
                ext: np.stack([_from_nullable(r["low"]), _from_nullable(r["high"])], axis=1)
                for ext, r in data.get("label_ranges", {}).items()
            },
            {
                ext: np.asarray(c, dtype=np.int64)
                for ext, c in data.get("member_counts", {}).items()
            },
        )
        columns = [
            table.sizes,
            table.counts,
            table.sha256,
            *table.label_ranges.values(),
            *table.member_counts.values(),
        ]
        if any(len(c) != len(table.names) for c in columns):
            raise ValueError("the shard columns have different lengths")
        return table


def _nullable(values: np.ndarray) -> list[int | None]:
    return [None if v == NO_LABEL else v for v in values.tolist()]


def _from_nullable(values: list[int | None]) -> np.ndarray:
    return np.asarray([NO_LABEL if v is None else v for v in values], dtype=np.int64)


class ShardList(Sequence[ShardInfo]):
    """`manifest.shards`: each ShardInfo built from the columns when asked for, so a
    manifest never holds per-sample Python objects."""

    def __init__(self, manifest: Manifest):
        self._manifest = manifest

    def __len__(self) -> int:
        return len(self._manifest.table)

    @overload
    def __getitem__(self, index: int) -> ShardInfo: ...

    @overload
    def __getitem__(self, index: slice) -> list[ShardInfo]: ...

    def __getitem__(self, index: int | slice) -> ShardInfo | list[ShardInfo]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._manifest.shard(range(len(self))[index])

    def __iter__(self) -> Iterator[ShardInfo]:
        return (self._manifest.shard(s) for s in range(len(self)))


@dataclass
class Manifest:
    """All shards of one split, in the order that defines sample indices: sample i is
    the i-th key when the shards are read in this order."""

    table: ShardTable
    samples: SampleColumns
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form facts about the split (source, classes, shape), for people."""
    version: int = VERSION
    """The format it was read from (1: an old manifest, held in memory)."""

    @property
    def num_samples(self) -> int:
        return self.table.num_samples

    @property
    def extensions(self) -> list[str]:
        return sorted(self.samples.members)

    @property
    def keys(self) -> Keys:
        return self.samples.keys

    @property
    def shards(self) -> ShardList:
        return ShardList(self)

    def shard(self, s: int) -> ShardInfo:
        """Shard s with its samples' keys, member columns and labels, read from the index."""
        lo, hi = int(self.table.starts[s]), int(self.table.starts[s + 1])
        members, labels = {}, {}
        for ext in self.extensions:
            col = np.asarray(self.samples.members[ext][lo:hi])
            if (col[:, 0] >= 0).any():
                members[ext] = {"offsets": col[:, 0].tolist(), "sizes": col[:, 1].tolist()}
                if ext in self.samples.labels:
                    labels[ext] = np.asarray(self.samples.labels[ext][lo:hi]).tolist()
        return ShardInfo(
            name=self.table.names[s],
            size=int(self.table.sizes[s]),
            sha256=self.table.sha256[s],
            keys=self.keys.range(lo, hi),
            members=members,
            label_ranges={
                ext: r[s].tolist()
                for ext, r in self.table.label_ranges.items()
                if r[s, 0] != NO_LABEL
            },
            labels=labels,
        )

    @classmethod
    def from_shards(
        cls, shards: Sequence[ShardInfo], meta: dict[str, Any] | None = None, version: int = VERSION
    ) -> Manifest:
        """A manifest held in memory (a fresh index, a v1 manifest), ready to write."""
        counts = [s.num_samples for s in shards]
        table = ShardTable(
            [s.name for s in shards],
            np.asarray([s.size for s in shards], dtype=np.int64),
            np.asarray(counts, dtype=np.int64),
            [s.sha256 for s in shards],
            {
                ext: np.asarray(
                    [s.label_ranges.get(ext, [NO_LABEL, NO_LABEL]) for s in shards],
                    dtype=np.int64,
                ).reshape(-1, 2)
                for ext in sorted({e for s in shards for e in s.label_ranges})
            },
        )

        members = {
            ext: _concat([_member_column(s, ext) for s in shards], (0, 2))
            for ext in sorted({e for s in shards for e in s.members})
        }
        table.member_counts = {ext: _per_shard(c[:, 0] >= 0, table) for ext, c in members.items()}
        labels = {
            ext: _concat([_label_column(s, ext) for s in shards], (0,))
            for ext in sorted({e for s in shards for e in s.labels})
        }
        keys = ListKeys([key for s in shards for key in s.keys])
        return cls(table, SampleColumns(members, labels, keys), dict(meta or {}), version)

    def to_json(self) -> dict[str, Any]:
        """manifest.json without its "index" entry (which names the files of one write)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "num_samples": self.num_samples,
            "num_shards": len(self.table),
            "meta": self.meta,
            "shards": self.table.to_json(),
        }


def _member_column(shard: ShardInfo, ext: str) -> np.ndarray:
    col = shard.members.get(ext)
    if col is None:
        return np.full((shard.num_samples, 2), -1, dtype=np.int64)
    return np.array([col["offsets"], col["sizes"]], dtype=np.int64).reshape(2, -1).T


def _label_column(shard: ShardInfo, ext: str) -> np.ndarray:
    return np.asarray(shard.labels.get(ext, [NO_LABEL] * shard.num_samples), dtype=np.int64)


def _per_shard(flags: np.ndarray, table: ShardTable) -> np.ndarray:
    """How many of each shard's samples are flagged."""
    running = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
    return running[table.starts[1:]] - running[table.starts[:-1]]


def _concat(parts: list[np.ndarray], empty: tuple[int, ...]) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate(parts)) if parts else np.zeros(empty, np.int64)


def manifest_path(split_dir: str | os.PathLike) -> Path:
    return Path(split_dir) / MANIFEST_NAME


def read_manifest(split_dir: str | os.PathLike) -> Manifest:
    """Load `split_dir/manifest.json` (v1 or v2), or raise DataError naming the file.

    A v2 manifest maps its index files: the cost is the shard table, not N."""
    path = manifest_path(split_dir)
    if not Path(split_dir).is_dir():
        raise DataError(f"{split_dir}: no such directory")
    if not path.is_file():
        raise DataError(
            f"{path}: manifest missing (run `ddp-shards index {Path(split_dir)}` for shards "
            "made by other tools)"
        )
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT or data.get("version") not in (1, VERSION):
            raise ValueError(f"not a {FORMAT} manifest of version 1 or 2")
        manifest = _from_v1(data) if data["version"] == 1 else _from_v2(Path(split_dir), data)
        if data.get("num_samples", manifest.num_samples) != manifest.num_samples:
            raise ValueError("num_samples does not match the shards")
        return manifest
    except IndexFileError as err:
        raise DataError(f"{err} (listed in {path}; re-run `ddp-shards index {split_dir}`)") from err
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: unreadable manifest: {err}") from err


def _from_v1(data: dict[str, Any]) -> Manifest:
    shards = [ShardInfo.from_json(s) for s in data["shards"]]
    return Manifest.from_shards(shards, dict(data.get("meta", {})), version=1)


def _from_v2(split_dir: Path, data: dict[str, Any]) -> Manifest:
    table = ShardTable.from_json(data["shards"])
    keys = PositionalKeys(table.names, table.starts)  # used only by an index without keys
    samples = open_columns(split_dir, data["index"], table.num_samples, keys)
    return Manifest(table, samples, dict(data.get("meta", {})))


def write_manifest(split_dir: str | os.PathLike, manifest: Manifest) -> Path:
    """Write the manifest as version 2: a new generation of index files, then
    manifest.json naming them (atomically replaced), then the old files go. A reader
    sees the old manifest or the new one, never a mix."""
    split_dir = Path(split_dir)
    try:
        entry = write_columns(split_dir, manifest.samples)
    except UnicodeEncodeError as err:
        raise DataError(f"{split_dir}: a key is not valid text: {err}") from err
    return write_json(split_dir, {**manifest.to_json(), "index": entry})


def write_json(split_dir: Path, content: dict[str, Any]) -> Path:
    """Replace manifest.json atomically, then drop index files it no longer names."""
    path = manifest_path(split_dir)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(content, separators=(",", ":")))
    os.replace(tmp, path)
    remove_other_generations(split_dir, content["index"]["generation"])
    return path


class SplitIndex:
    """A split's samples by global index, for the loader: which shard (a search over
    the shard starts), where its members lie (mapped columns), its key (read only to
    name it). O(shards) memory; a lookup touches the pages of the samples it asks for.
    """

    def __init__(self, table: ShardTable, samples: SampleColumns):
        self.table, self.samples = table, samples
        self.shard_names: list[str] = table.names
        self.shard_sizes: list[int] = table.sizes.tolist()
        self.keys: Keys = samples.keys
        self.offsets: dict[str, np.ndarray] = {e: c[:, 0] for e, c in samples.members.items()}
        """ext -> int64 per sample (-1 where missing), a view of the mapped column."""
        self.sizes: dict[str, np.ndarray] = {e: c[:, 1] for e, c in samples.members.items()}
        self.labels: dict[str, np.ndarray] = samples.labels

    @property
    def num_samples(self) -> int:
        return self.table.num_samples

    def shard_of(self, indices: np.ndarray) -> np.ndarray:
        return self.table.shard_of(indices)

    def shard_range(self, shard: int) -> range:
        """The sample indices of one shard."""
        return range(int(self.table.starts[shard]), int(self.table.starts[shard + 1]))

    def __reduce__(self) -> tuple[Any, ...]:
        return SplitIndex, (self.table, self.samples)  # the columns pickle by path

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> SplitIndex:
        return cls(manifest.table, manifest.samples)
