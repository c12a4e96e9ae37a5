"""The data the tests read, and the helpers that copy or damage shards.

Digits shards are made once per session by the real prepare step; the damaged copies
(a NaN sample, an undecodable one) once per session too, and only when a test asks.
Nothing here writes into a fixture's shards: tests that damage data copy it first.
Registered by conftest.py (`pytest_plugins`).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from ddp.shards import index_split, read_manifest
from ddp.shards.prepare import prepare_digits, prepare_photos, prepare_synthetic
from tests import harness

# ---- shards made once per session


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's digits as `ddp-shards prepare digits` makes them: 1,438 training
    samples in 6 shards of <= 256, 359 validation samples."""
    out = tmp_path_factory.mktemp("data") / "digits"
    prepare_digits(out, shard_size=256, seed=0, val_fraction=0.2)
    return out


@pytest.fixture(scope="session")
def png_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """90 synthetic 5x4 RGB images in 3 classes, stored as PNG, 32 to a shard."""
    out = tmp_path_factory.mktemp("png")
    prepare_synthetic(out, 90, (5, 4, 3), num_classes=3, fmt="png", shard_size=32)
    return out


@pytest.fixture(scope="session")
def photos_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`ddp-shards prepare photos` at a small size: 160 JPEGs of about 64x56 in 8 classes,
    128 for training in 3 shards of <= 48, 32 for validation."""
    out = tmp_path_factory.mktemp("photos")
    prepare_photos(out, 160, seed=0, size=(64, 56), shard_size=48, val_fraction=0.2)
    return out


UNEVEN = (30, 7, 19, 1, 25, 12, 8)
"""102 samples in 7 shards: fewer shards than ranks x workers for 4 x 2."""
FEW = (40, 23)
"""63 samples in 2 shards: fewer shards than ranks from 3 ranks on."""
EVEN = (12,) * 8
"""96 samples in 8 shards: a multiple of 2 ranks x 2 workers."""


@pytest.fixture(scope="session")
def stream_splits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Numbered-sample splits (see `write_split`) of UNEVEN, FEW and EVEN shard sizes."""
    root = tmp_path_factory.mktemp("stream")
    return {
        name: write_split(root / name, sizes)
        for name, sizes in (("uneven", UNEVEN), ("few", FEW), ("even", EVEN))
    }


@pytest.fixture(scope="session")
def nan_root(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits where one training sample is NaN: only its rank sees the bad loss."""
    out = tmp_path_factory.mktemp("nan") / "digits"
    return copy_shards(digits_root, out, edit_first_npy=poison_with_nan)


@pytest.fixture(scope="session")
def garbled_root(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits with one undecodable training sample (same size: the manifest still matches)."""
    out = tmp_path_factory.mktemp("garbled") / "digits"
    return copy_shards(digits_root, out, edit_first_npy=garble)


# ---- a short training run


def smoke_overrides(digits_root: Path, run_root: Path, name: str | None, *extra: str) -> list[str]:
    """conf/experiment/smoke.yaml (an MLP, 2 epochs) on digits, as run `name` in run_root
    (None: the default name, <experiment>-<hash of the overrides>)."""
    named = [f"run.name={name}"] if name is not None else []
    return ["experiment=smoke", f"data.root={digits_root}", f"run.root={run_root}", *named, *extra]


@pytest.fixture
def smoke(digits_root: Path, tmp_path: Path) -> list[str]:
    """The smoke run's overrides, in tmp_path/runs/test."""
    return smoke_overrides(digits_root, tmp_path / "runs", "test")


# ---- copying and damaging shards


def copy_split(src: Path, dst: Path) -> Path:
    """A byte copy of one split (shards and manifest)."""
    dst.mkdir(parents=True)
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def corrupt_npy(split: Path, shard_pos: int, sample: int) -> str:
    """Overwrite a member's npy magic in place (size unchanged); return its key."""
    shard = read_manifest(split).shards[shard_pos]
    path = split / shard.name
    data = bytearray(path.read_bytes())
    offset = shard.members["npy"]["offsets"][sample]
    data[offset : offset + 6] = b"garbag"
    path.write_bytes(bytes(data))
    return shard.keys[sample]


def corrupt_member(split: Path, shard_pos: int, sample: int, ext: str, edit) -> str:
    """Rewrite one member in place with `edit(bytes) -> bytes` of the same size (the
    manifest still matches); return its key."""
    shard = read_manifest(split).shards[shard_pos]
    path = split / shard.name
    data = bytearray(path.read_bytes())
    offset, size = shard.members[ext]["offsets"][sample], shard.members[ext]["sizes"][sample]
    edited = edit(bytes(data[offset : offset + size]))
    assert len(edited) == size
    data[offset : offset + size] = edited
    path.write_bytes(bytes(data))
    return shard.keys[sample]


def break_huffman_table(jpeg: bytes) -> bytes:
    """The JPEG with its first Huffman table's code counts overflowing: the headers a
    reader checks first (size, scan, end marker) stay valid, decoding fails."""
    at = jpeg.index(b"\xff\xc4") + 5  # marker, length (2), table class/id (1)
    return jpeg[:at] + b"\xff" * 16 + jpeg[at + 16 :]


def as_v1(split: Path, label_ranges: bool = True) -> None:
    """Rewrite a split's manifest in the version 1 layout (every key and member offset in
    manifest.json), as `ddp-shards index` wrote it before manifest v2; the v2 index files
    go. `label_ranges=False`: as written before label ranges were recorded."""
    manifest = read_manifest(split)
    shards = [
        {
            "name": s.name,
            "size": s.size,
            "sha256": s.sha256,
            "num_samples": s.num_samples,
            "keys": s.keys,
            "members": s.members,
            **({"label_ranges": s.label_ranges} if label_ranges else {}),
        }
        for s in manifest.shards
    ]
    head = {"format": "ddp-shards", "version": 1, "num_samples": manifest.num_samples}
    content = {**head, "num_shards": len(shards), "meta": manifest.meta, "shards": shards}
    (split / "manifest.json").write_text(json.dumps(content, separators=(",", ":")))
    for path in split.glob("manifest.*.*"):
        path.unlink()


def copy_shards(src: Path, dst: Path, edit_first_npy: Callable[[bytes], bytes]) -> Path:
    """Copy a data root, rewriting the first training `.npy` member with `edit_first_npy(bytes)`,
    then index the copy with the real `ddp-shards index` (as a user's own tools would)."""
    edited = False
    for split in ("train", "val"):
        (dst / split).mkdir(parents=True)
        for shard in sorted((src / split).glob("*.tar")):
            with tarfile.open(shard) as tin, tarfile.open(dst / split / shard.name, "w") as tout:
                for member in tin.getmembers():
                    payload = tin.extractfile(member).read()
                    if split == "train" and member.name.endswith(".npy") and not edited:
                        payload, edited = edit_first_npy(payload), True
                    member.size = len(payload)
                    tout.addfile(member, io.BytesIO(payload))
        out = harness.run([str(harness.BIN / "ddp-shards"), "index", str(dst / split)], timeout=60)
        assert out.returncode == 0, out.stderr
    return dst


def poison_with_nan(payload: bytes) -> bytes:
    array = np.load(io.BytesIO(payload))
    array[...] = np.nan
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def garble(payload: bytes) -> bytes:
    return b"\x00garbage" * (len(payload) // 8) + b"\x00" * (len(payload) % 8)


def write_split(split: Path, sizes: tuple[int, ...]) -> list[Path]:
    """Shards of `sizes` samples: sample i is KEY.npy = full((1, 2, 2), i) + KEY.cls."""
    split.mkdir(parents=True)
    paths, i = [], 0
    for number, size in enumerate(sizes):
        path = split / f"shard-{number:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for _ in range(size):
                npy = io.BytesIO()
                np.save(npy, np.full((1, 2, 2), i, dtype=np.float32))
                for ext, data in (("cls", str(i % 10).encode()), ("npy", npy.getvalue())):
                    info = tarfile.TarInfo(f"s{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                i += 1
        paths.append(path)
    index_split(split, paths)
    return paths
