"""Index tar shards from their headers: keys, member offsets and sizes.

Works on any WebDataset-style tar (ours, GNU `tar`, webdataset's ShardWriter)
without rewriting or decoding it: only the 512-byte headers are read, and the
tarfile module seeks over member data.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from collections.abc import Iterable
from pathlib import Path

from ddp.shards.columns import NO_LABEL
from ddp.shards.decode import LABEL_EXTS
from ddp.shards.manifest import (
    DataError,
    Manifest,
    ShardInfo,
    manifest_path,
    read_manifest,
    write_manifest,
)
from ddp.shards.tar import split_member_name

SHARD_GLOB = "*.tar"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def scan_members(path: Path) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every regular member, in tar order.

    Raises DataError naming the shard when the tar is unreadable or truncated.
    """
    file_size = path.stat().st_size
    members = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if info.isreg():
                    members.append((info.name, info.offset_data, info.size))
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable tar: {err}") from err
    for name, offset, size in members:
        if offset + size > file_size:
            raise DataError(
                f"{path}: truncated tar: member {name} ends at byte {offset + size:,}, "
                f"file has {file_size:,}"
            )
    return members


def index_shard(path: Path, name: str | None = None, checksum: bool = True) -> ShardInfo:
    """The ShardInfo of one tar: consecutive members with one key form a sample."""
    keys: list[str] = []
    columns: dict[str, dict[str, list[int]]] = {}
    seen: set[str] = set()
    for member, offset, size in scan_members(path):
        parts = split_member_name(member)
        if parts is None:
            continue
        key, ext = parts
        if "\n" in key:
            raise DataError(f"{path}: key {key!r} holds a newline (keys are stored one per line)")
        if not keys or keys[-1] != key:
            if key in seen:
                raise DataError(f"{path}: key {key} appears twice (members are not grouped)")
            seen.add(key)
            keys.append(key)
            for col in columns.values():
                col["offsets"].append(-1)
                col["sizes"].append(-1)
        col = columns.setdefault(ext, {"offsets": [-1] * len(keys), "sizes": [-1] * len(keys)})
        if col["offsets"][-1] != -1:
            raise DataError(f"{path}: key {key} has two .{ext} members")
        col["offsets"][-1] = offset
        col["sizes"][-1] = size
    labels = read_labels(path, columns)
    return ShardInfo(
        name=name or path.name,
        size=path.stat().st_size,
        sha256=sha256_file(path) if checksum else "",
        keys=keys,
        members=dict(sorted(columns.items())),
        label_ranges=label_ranges(labels, columns),
        labels=labels,
    )


def read_labels(path: Path, columns: dict[str, dict[str, list[int]]]) -> dict[str, list[int]]:
    """The integer label of every sample, per label column (NO_LABEL where a sample has
    no such member, or one that is not a plain integer)."""
    labels = {}
    with open(path, "rb") as f:
        for ext in sorted(set(columns) & set(LABEL_EXTS)):
            col = columns[ext]
            labels[ext] = [
                _integer(os.pread(f.fileno(), size, offset)) if offset >= 0 else NO_LABEL
                for offset, size in zip(col["offsets"], col["sizes"], strict=True)
            ]
    return labels


def _integer(data: bytes) -> int:
    """The label in a member, or NO_LABEL when it is not an integer that int64 holds."""
    try:
        value = int(data)
    except ValueError:
        return NO_LABEL
    return value if NO_LABEL < value < -NO_LABEL else NO_LABEL


def label_ranges(
    labels: dict[str, list[int]], columns: dict[str, dict[str, list[int]]]
) -> dict[str, list[int]]:
    """[smallest, largest] of every label column whose members are all plain integers
    (otherwise the loader judges them per sample)."""
    ranges = {}
    for ext, values in labels.items():
        present = [
            v for v, offset in zip(values, columns[ext]["offsets"], strict=True) if offset >= 0
        ]
        if present and NO_LABEL not in present:
            ranges[ext] = [min(present), max(present)]
    return ranges


def find_shards(split_dir: Path) -> list[Path]:
    """The split's tar files, sorted by name (the order that numbers samples)."""
    return sorted(p for p in split_dir.glob(SHARD_GLOB) if p.is_file())


def index_split(
    split_dir: str | os.PathLike,
    shards: Iterable[Path] | None = None,
    meta: dict | None = None,
    write: bool = True,
) -> Manifest:
    """Build (and by default write) the manifest of a split directory's tars."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: no such directory")
    paths = list(shards) if shards is not None else find_shards(split_dir)
    if not paths:
        raise DataError(f"{split_dir}: no *.tar shards to index")
    if meta is None:
        meta = _previous_meta(split_dir)
    infos = [index_shard(p, name=str(p.relative_to(split_dir))) for p in paths]
    _check_unique_keys(split_dir, infos)
    manifest = Manifest.from_shards(infos, meta)
    if write:
        write_manifest(split_dir, manifest)
    return manifest


def upgrade_split(split_dir: str | os.PathLike) -> Manifest:
    """Rewrite a split's manifest as version 2 from the manifest itself, without reading
    the shards (for large splits indexed by an older version; `index_split` re-reads
    them). Labels per sample are not known then; label ranges are kept."""
    manifest = read_manifest(split_dir)
    write_manifest(split_dir, manifest)
    return manifest


def manifest_version(split_dir: str | os.PathLike) -> int | None:
    """The version of the split's manifest.json; None when there is none (or it is not
    readable: the index replaces it)."""
    try:
        with open(manifest_path(split_dir), "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    match = re.search(rb'"version"\s*:\s*(\d+)', head)
    return int(match.group(1)) if match else None


def _previous_meta(split_dir: Path) -> dict:
    """Re-indexing keeps what prepare recorded (classes, shape, source), even when the
    old index files are gone or broken: only the JSON is read."""
    try:
        meta = json.loads(manifest_path(split_dir).read_text()).get("meta", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _check_unique_keys(split_dir: Path, shards: list[ShardInfo]) -> None:
    owner: dict[str, str] = {}
    for shard in shards:
        for key in shard.keys:
            if key in owner:
                raise DataError(f"{split_dir}: key {key} is in both {owner[key]} and {shard.name}")
            owner[key] = shard.name
