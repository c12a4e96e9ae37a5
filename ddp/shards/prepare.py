"""Turn raw data into train/val splits of tar shards with manifests.

All three sources are seeded and offline: scikit-learn's bundled digits, a
synthetic set of learnable class patterns, and an image folder on disk.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from ddp.shards.decode import IMAGE_EXTS
from ddp.shards.manifest import DataError, Manifest
from ddp.shards.writer import ShardWriter

Sample = tuple[str, dict[str, bytes]]


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def encode_image(array: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    buffer = io.BytesIO()
    if fmt == "jpg":
        image.save(buffer, format="JPEG", quality=95)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def split_indices(num: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, seeded train/val partition of range(num), each part sorted."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction={val_fraction} must be in [0, 1)")
    order = np.random.Generator(np.random.PCG64([seed, 2**31])).permutation(num)
    num_val = int(round(num * val_fraction))
    return np.sort(order[num_val:]), np.sort(order[:num_val])


def write_split(
    split_dir: Path, samples: Iterable[Sample], shard_size: int, meta: dict
) -> Manifest | None:
    """Write one split's shards and manifest; None when there is no sample."""
    writer = ShardWriter(split_dir, shard_size, meta=meta)
    wrote = False
    for key, members in samples:
        writer.write(key, members)
        wrote = True
    return writer.close() if wrote else None


def _write_splits(
    out: Path,
    make: Callable[[np.ndarray], Iterator[Sample]],
    num: int,
    val_fraction: float,
    seed: int,
    shard_size: int,
    meta: dict,
) -> dict[str, Manifest]:
    train, val = split_indices(num, val_fraction, seed)
    manifests = {}
    for name, indices in (("train", train), ("val", val)):
        manifest = write_split(out / name, make(indices), shard_size, {**meta, "split": name})
        if manifest is not None:
            manifests[name] = manifest
    return manifests


def prepare_digits(
    out: Path, shard_size: int = 256, seed: int = 0, val_fraction: float = 0.2
) -> dict[str, Manifest]:
    """scikit-learn's 1,797 8x8 digits as KEY.npy (float32 1x8x8 in [0,1]) + KEY.cls."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(int)

    def make(indices: np.ndarray) -> Iterator[Sample]:
        for i in indices:
            yield f"digits-{i:06d}", {"npy": encode_npy(images[i]), "cls": str(labels[i]).encode()}

    meta = {
        "source": "sklearn.datasets.load_digits",
        "num_classes": 10,
        "shape": [1, 8, 8],
        "seed": seed,
    }
    return _write_splits(Path(out), make, len(labels), val_fraction, seed, shard_size, meta)


def synthetic_arrays(
    num_samples: int, shape: tuple[int, int, int], num_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 HxWxC images: a per-class mean pattern plus noise, so the set is learnable."""
    rng = np.random.Generator(np.random.PCG64(seed))
    patterns = rng.uniform(0, 255, size=(num_classes, *shape))
    labels = rng.integers(0, num_classes, size=num_samples)
    noise = rng.normal(0, 40, size=(num_samples, *shape))
    images = np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8)
    return images, labels


def prepare_synthetic(
    out: Path,
    num_samples: int,
    shape: tuple[int, int, int],
    num_classes: int = 10,
    seed: int = 0,
    fmt: str = "npy",
    shard_size: int = 1000,
    val_fraction: float = 0.1,
) -> dict[str, Manifest]:
    if fmt not in ("npy", "png", "jpg"):
        raise ValueError(f"--format={fmt} must be npy, png or jpg")
    images, labels = synthetic_arrays(num_samples, shape, num_classes, seed)

    def make(indices: np.ndarray) -> Iterator[Sample]:
        for i in indices:
            data = encode_npy(images[i]) if fmt == "npy" else encode_image(images[i], fmt)
            yield f"synth-{i:08d}", {fmt: data, "cls": str(labels[i]).encode()}

    meta = {
        "source": "synthetic",
        "num_classes": num_classes,
        "shape": list(shape),
        "format": fmt,
        "seed": seed,
    }
    return _write_splits(Path(out), make, num_samples, val_fraction, seed, shard_size, meta)


def find_images(src: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Classes (sorted sub-folder names) and (file, label) pairs, in a stable order."""
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{src}: no class folders (expected SRC/CLASS/*.jpg|png)")
    files = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((src / name).iterdir())
        if path.suffix.lower().lstrip(".") in IMAGE_EXTS and path.is_file()
    ]
    if not files:
        raise DataError(f"{src}: no jpg/png images in its class folders")
    return classes, files


def prepare_imagefolder(
    src: Path, out: Path, shard_size: int = 1000, seed: int = 0, val_fraction: float = 0.1
) -> dict[str, Manifest]:
    """SRC/CLASS/*.jpg|png -> KEY.jpg|png (bytes as they are) + KEY.cls + KEY.source
    (the file's path relative to SRC, so a sample can be traced back to its file)."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: no such directory")
    classes, files = find_images(src)

    def make(indices: np.ndarray) -> Iterator[Sample]:
        for i in indices:
            path, label = files[i]
            ext = path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
            members = {ext: path.read_bytes(), "cls": str(label).encode()}
            members["source"] = str(path.relative_to(src)).encode()
            yield f"img-{i:08d}", members

    meta = {"source": str(src), "classes": classes, "num_classes": len(classes), "seed": seed}
    return _write_splits(Path(out), make, len(files), val_fraction, seed, shard_size, meta)
