"""Check a split directory end to end: the deep counterpart of the loader's cheap
open-time checks (presence and size)."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ddp.errors import DataError
from ddp.shards.decode import IMAGE_EXTS, decode_member
from ddp.shards.index import find_shards, index_shard, sha256_file
from ddp.shards.manifest import ShardInfo, read_manifest

EXAMPLES = 3
"""Odd samples a shape line names before it counts the rest."""


@dataclass
class SplitReport:
    """What `verify_split` found: problems (the split is not sound, one line each naming
    the shard and key) and notes (worth knowing, not wrong)."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def verify_split(
    split_dir: str | os.PathLike, decode: bool = True, augment: bool = True
) -> SplitReport:
    """Every problem found, one line each naming the shard (and key): checksums, sample
    counts, offsets against the tar headers, decodability of every member, and members
    whose shapes a batch cannot stack. No problems means the split is sound.

    Shapes are judged as the loader reads them. It stacks arrays (.npy) as stored, so one
    extension's arrays must share a shape. Encoded images (.jpg, .png, ...) come in
    whatever sizes the photos had: data.augment crops each to one size, so `augment`
    (the default) takes mixed sizes as a note, not a problem. `augment=False` judges a
    split read without data.augment, where images too are stacked as stored."""
    split_dir = Path(split_dir)
    manifest = read_manifest(split_dir)
    report = SplitReport()
    listed = {split_dir / name for name in manifest.table.names}
    for path in find_shards(split_dir):
        if path not in listed:
            report.problems.append(f"{path}: shard not in the manifest (re-run `ddp-shards index`)")
    shapes = ShapeTally()
    for shard in manifest.shards:  # one shard's index in memory at a time
        report.problems.extend(_verify_shard(split_dir / shard.name, shard, decode, shapes))
    for ext in shapes.mixed():
        if augment and is_image(ext):
            report.notes.append(_cropped_sizes(split_dir, ext, shapes))
        else:
            report.problems.append(_odd_shapes(split_dir, ext, shapes))
    return report


def is_image(ext: str) -> bool:
    """An encoded image (`jpg`, `seg.png`, ...): data.augment decodes and crops it."""
    return ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTS


class ShapeTally:
    """The shapes each extension's decoded members come in: a count per shape and the
    first few samples of each. Memory grows with the number of shapes: a few for arrays
    however many samples, up to one per sample for photos."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.first: dict[str, dict[tuple, list[tuple[int, str]]]] = defaultdict(dict)
        self._seen = 0

    def add(self, ext: str, shape: tuple, name: str) -> None:
        """One member of `ext` with `shape`; `name` says where it is ('SHARD key KEY')."""
        self._seen += 1
        self.counts[ext][shape] += 1
        first = self.first[ext].setdefault(shape, [])
        if len(first) < EXAMPLES:
            first.append((self._seen, name))

    def mixed(self) -> list[str]:
        """The extensions whose members come in more than one shape."""
        return [ext for ext, counts in self.counts.items() if len(counts) > 1]

    def common(self, ext: str) -> tuple[tuple, int, int]:
        """`ext`'s most common shape, how many members have it, and how many there are."""
        counts = self.counts[ext]
        shape, many = counts.most_common(1)[0]
        return shape, many, sum(counts.values())

    def odd(self, ext: str) -> list[str]:
        """The first few members (in split order) whose shape is not the most common,
        each with its shape."""
        common = self.common(ext)[0]
        found = [
            (order, f"{name} {shape}")
            for shape, first in self.first[ext].items()
            if shape != common
            for order, name in first
        ]
        return [text for _, text in sorted(found)[:EXAMPLES]]


def _odd_shapes(split_dir: Path, ext: str, shapes: ShapeTally) -> str:
    """One line for all of `ext`'s members that a batch cannot stack with the others."""
    common, many, total = shapes.common(ext)
    odd = shapes.odd(ext)
    more = total - many - len(odd)
    named = ", ".join(odd) + (f" and {more:,} more" if more else "")
    fix = "write them at one shape"
    if is_image(ext):
        fix = "set data.augment to crop them to one size"
    return (
        f"{split_dir}: {total - many:,} of {total:,} .{ext} members differ from the most "
        f"common shape {common} ({many:,} members): {named}; the loader stacks inputs as "
        f"stored, and a batch needs one shape ({fix})"
    )


def _cropped_sizes(split_dir: Path, ext: str, shapes: ShapeTally) -> str:
    """The note for images of mixed sizes, which data.augment crops to one size."""
    common, many, total = shapes.common(ext)
    sizes = len(shapes.counts[ext])
    return (
        f"{split_dir}: note: the {total:,} .{ext} images come in {sizes:,} sizes (the most "
        f"common, {common}, in {many:,}): fine where data.augment crops them to one size; "
        "read without it, a batch needs one size (check with --no-augment)"
    )


def _verify_shard(path: Path, shard: ShardInfo, decode: bool, shapes: ShapeTally) -> list[str]:
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


def _decode_errors(path: Path, shard: ShardInfo, shapes: ShapeTally) -> Iterator[str]:
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
                shapes.add(ext, value.shape, f"{shard.name} key {key}")
