"""The manifest: what a split directory of tar shards holds, and where.

`manifest.json` sits beside the shards of one split. Per shard it records the
sample count, byte size and sha256, and per sample the key plus the byte offset
and size of every member (columns per extension), so a reader seeks to any
sample without scanning a tar. Shards stay plain WebDataset tars; the manifest
is an index beside them, never a replacement.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_NAME = "manifest.json"
FORMAT = "ddp-shards"
VERSION = 1


class DataError(Exception):
    """Bad data: missing or corrupt shard, stale manifest, undecodable sample.

    The message names the culprit (shard path, and key where there is one).
    """


@dataclass
class ShardInfo:
    """One tar shard and the index of its samples."""

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

    @property
    def num_samples(self) -> int:
        return len(self.keys)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "num_samples": self.num_samples,
            "keys": self.keys,
            "members": self.members,
            "label_ranges": self.label_ranges,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardInfo:
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
class Manifest:
    """All shards of one split, in the order that defines sample indices."""

    shards: list[ShardInfo]
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form facts about the split (source, classes, shape), for people."""

    @property
    def num_samples(self) -> int:
        return sum(shard.num_samples for shard in self.shards)

    @property
    def extensions(self) -> list[str]:
        return sorted({ext for shard in self.shards for ext in shard.members})

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "num_samples": self.num_samples,
            "num_shards": len(self.shards),
            "meta": self.meta,
            "shards": [shard.to_json() for shard in self.shards],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} v{VERSION} manifest")
        manifest = cls([ShardInfo.from_json(s) for s in data["shards"]], dict(data.get("meta", {})))
        if data.get("num_samples", manifest.num_samples) != manifest.num_samples:
            raise ValueError("num_samples does not match the shards' keys")
        return manifest


def manifest_path(split_dir: str | os.PathLike) -> Path:
    return Path(split_dir) / MANIFEST_NAME


def read_manifest(split_dir: str | os.PathLike) -> Manifest:
    """Load `split_dir/manifest.json`, or raise DataError naming the file."""
    path = manifest_path(split_dir)
    if not Path(split_dir).is_dir():
        raise DataError(f"{split_dir}: no such directory")
    if not path.is_file():
        raise DataError(
            f"{path}: manifest missing (run `ddp-shards index {Path(split_dir)}` for shards "
            "made by other tools)"
        )
    try:
        return Manifest.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: unreadable manifest: {err}") from err


def write_manifest(split_dir: str | os.PathLike, manifest: Manifest) -> Path:
    """Write the manifest atomically, so a reader never sees half a file."""
    path = manifest_path(split_dir)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_json(), separators=(",", ":")))
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class SplitIndex:
    """The manifest flattened into arrays over global sample indices.

    Sample i of the split is the i-th key when shards are read in manifest order.
    Arrays make a micro-batch's lookup one fancy-index, not a Python loop.
    """

    shard_names: list[str]
    shard_sizes: list[int]
    shard_of: np.ndarray
    """int32 per sample: position of its shard in shard_names."""
    keys: list[str]
    offsets: dict[str, np.ndarray]
    """ext -> int64 per sample (-1 where missing)."""
    sizes: dict[str, np.ndarray]

    @property
    def num_samples(self) -> int:
        return len(self.keys)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> SplitIndex:
        exts = manifest.extensions
        counts = [shard.num_samples for shard in manifest.shards]
        shard_of = np.repeat(np.arange(len(counts), dtype=np.int32), counts)

        def column(ext: str, part: str) -> np.ndarray:
            missing = [-1]
            parts = [
                np.asarray(
                    s.members.get(ext, {}).get(part, missing * s.num_samples), dtype=np.int64
                )
                for s in manifest.shards
            ]
            return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

        return cls(
            shard_names=[s.name for s in manifest.shards],
            shard_sizes=[s.size for s in manifest.shards],
            shard_of=shard_of,
            keys=[key for s in manifest.shards for key in s.keys],
            offsets={ext: column(ext, "offsets") for ext in exts},
            sizes={ext: column(ext, "sizes") for ext in exts},
        )
