"""Index tar shards from their headers: keys, member offsets and sizes.

Works on any WebDataset-style tar (ours, GNU `tar`, webdataset's ShardWriter)
without rewriting or decoding it: only the 512-byte headers are read, and the
tarfile module seeks over member data.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import tarfile
from collections.abc import Iterable
from pathlib import Path

from ddp.errors import DataError
from ddp.shards.columns import NO_LABEL
from ddp.shards.decode import LABEL_EXTS
from ddp.shards.manifest import Manifest, ShardInfo, manifest_path, read_manifest, write_manifest
from ddp.shards.tar import split_member_name

SHARD_GLOB = "*.tar"
COMPRESSED = {".gz": gzip.open, ".tgz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
"""Compressed tars: streamable, not seekable; `decompress` writes the plain tar beside."""


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


def find_compressed(split_dir: Path) -> list[Path]:
    """Compressed tars (x.tar.gz, x.tgz, x.tar.bz2, x.tar.xz) without their plain tar."""
    found = []
    for path in sorted(p for p in split_dir.iterdir() if p.suffix in COMPRESSED):
        if (path.name.endswith(".tgz") or path.stem.endswith(".tar")) and not plain(path).exists():
            found.append(path)
    return found


def plain(path: Path) -> Path:
    """x.tar.gz -> x.tar, x.tgz -> x.tar."""
    return path.with_suffix(".tar") if path.suffix == ".tgz" else path.with_suffix("")


def decompress(path: Path) -> Path:
    """Write the plain tar beside a compressed one (atomically: a partial file is never
    left under the final name) and return its path."""
    target = plain(path)
    partial = target.with_name(f".{target.name}.partial")
    try:
        with COMPRESSED[path.suffix](path, "rb") as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(partial, target)
    except (OSError, EOFError) as err:
        partial.unlink(missing_ok=True)
        raise DataError(f"{path}: cannot decompress: {err}") from err
    return target


def index_split(
    split_dir: str | os.PathLike,
    shards: Iterable[Path] | None = None,
    meta: dict | None = None,
    write: bool = True,
    decompress_first: bool = False,
) -> Manifest:
    """Build (and by default write) the manifest of a split directory's tars.

    Compressed shards cannot be read by offset: they are refused with the command that
    converts them, or (decompress_first) decompressed into plain tars beside them first.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: no such directory")
    compressed = find_compressed(split_dir) if shards is None else []
    if compressed and not decompress_first:
        names = ", ".join(p.name for p in compressed[:2]) + (", ..." if len(compressed) > 2 else "")
        raise DataError(
            f"{split_dir}: {len(compressed)} compressed shard(s) ({names}): the indexed loader "
            f"seeks into plain tars; run `ddp-shards index {split_dir} --decompress` (writes "
            "x.tar beside each), or stream them as they are with data.stream.urls"
        )
    for path in compressed:
        decompress(path)
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
