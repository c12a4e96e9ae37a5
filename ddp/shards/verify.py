"""Check a split directory end to end: the deep counterpart of the loader's cheap
open-time checks (presence and size)."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ddp.shards.decode import decode_member
from ddp.shards.index import find_shards, index_shard, sha256_file
from ddp.shards.manifest import DataError, ShardInfo, read_manifest


def verify_split(split_dir: str | os.PathLike, decode: bool = True) -> list[str]:
    """Every problem found, one line each naming the shard (and key): checksums,
    sample counts, offsets against the tar headers, decodability of every member.
    An empty list means the split is sound."""
    split_dir = Path(split_dir)
    manifest = read_manifest(split_dir)
    problems: list[str] = []
    listed = {split_dir / name for name in manifest.table.names}
    for path in find_shards(split_dir):
        if path not in listed:
            problems.append(f"{path}: shard not in the manifest (re-run `ddp-shards index`)")
    shapes: dict[str, list[tuple[Path, str, tuple]]] = defaultdict(list)
    for shard in manifest.shards:  # one shard's index in memory at a time
        problems.extend(_verify_shard(split_dir / shard.name, shard, decode, shapes))
    problems.extend(_odd_shapes(shapes))
    return problems


def _odd_shapes(shapes: dict[str, list[tuple[Path, str, tuple]]]) -> Iterator[str]:
    """Arrays and images of one extension should share a shape (a batch stacks them):
    the samples that differ from the split's most common shape, named."""
    for ext, seen in shapes.items():
        counts = Counter(shape for _, _, shape in seen)
        if len(counts) < 2:
            continue
        common, many = counts.most_common(1)[0]
        for path, key, shape in seen:
            if shape != common:
                yield (
                    f"{path}: key {key}: .{ext} has shape {shape}, the split's is {common} "
                    f"({many:,} of {len(seen):,} samples): batches need one shape (use "
                    "data.augment, or a resizing data.transform)"
                )


def _verify_shard(path: Path, shard: ShardInfo, decode: bool, shapes: dict) -> list[str]:
    if not path.is_file():
        return [f"{path}: shard missing"]
    size = path.stat().st_size
    if size != shard.size:
        return [f"{path}: {size:,} bytes but the manifest says {shard.size:,}"]
    problems = []
    if sha256_file(path) != shard.sha256:
        problems.append(f"{path}: sha256 does not match the manifest (shard changed)")
    try:
        actual = index_shard(path, name=shard.name, checksum=False)
    except DataError as err:
        return [*problems, str(err)]
    if actual.keys != shard.keys:
        problems.append(
            f"{path}: holds {actual.num_samples} samples, manifest lists {shard.num_samples}"
            if actual.num_samples != shard.num_samples
            else f"{path}: keys differ from the manifest"
        )
    elif actual.members != shard.members:
        problems.append(f"{path}: member offsets differ from the manifest (re-run index)")
    elif any(actual.labels.get(ext) != labels for ext, labels in shard.labels.items()):
        problems.append(f"{path}: labels differ from the manifest (re-run index)")
    if decode and not problems:
        problems.extend(_decode_errors(path, shard, shapes))
    return problems


def _decode_errors(path: Path, shard: ShardInfo, shapes: dict) -> Iterator[str]:
    with open(path, "rb") as f:
        data = f.read()
    for i, key in enumerate(shard.keys):
        for ext, column in shard.members.items():
            offset, size = column["offsets"][i], column["sizes"][i]
            if offset < 0:
                continue
            try:
                value = decode_member(ext, data[offset : offset + size])
            except Exception as err:  # noqa: BLE001 - any failure means undecodable
                yield f"{path}: key {key}: .{ext} does not decode: {type(err).__name__}: {err}"
                continue
            if isinstance(value, np.ndarray):
                shapes[ext].append((path, key, value.shape))
