"""Turn raw data into train/val splits of tar shards with manifests.

All four sources are seeded and offline: scikit-learn's bundled digits, natural-image
JPEGs cut from scikit-learn's two sample photos, a synthetic set of learnable class
patterns, and an image folder on disk.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ddp.errors import ConfigError, DataError
from ddp.shards.decode import IMAGE_EXTS
from ddp.shards.manifest import Manifest
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
        raise ConfigError(f"--val-fraction={val_fraction} must be in [0, 1)")
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


PHOTOS = ("china", "flower")
"""scikit-learn's sample photos (640x427 each), in load_sample_images' order."""
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")


@functools.cache
def sample_photos() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(load_sample_images().images)


def photo_sample(
    index: int, seed: int, size: tuple[int, int] = (400, 350), quality: int = 90
) -> tuple[bytes, int]:
    """Sample `index`: a JPEG cut from one of the two photos, and its label.

    The photo alternates with the index; a region of 45-90% of the photo's height, its
    center drawn in one of the photo's four quadrants, is rescaled to about `size`
    (width, height; each side within +-20%, the aspect varied too) and saved at
    `quality`. The label is photo x 4 + quadrant (8 classes, see `photo_classes`):
    learnable from the content, and a random crop of the image mostly keeps it. A pure
    function of (index, seed): any worker count writes the same bytes.
    """
    from PIL import Image

    photos = sample_photos()
    rng = np.random.Generator(np.random.PCG64([seed, index, 0x70686F]))
    source = index % len(photos)
    photo = photos[source]
    height, width = photo.shape[:2]
    zoom, aspect = rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.18)
    out_w = max(8, round(size[0] * zoom * math.sqrt(aspect)))
    out_h = max(8, round(size[1] * zoom / math.sqrt(aspect)))
    region_h = rng.uniform(0.45, 0.9) * height
    region_w = min(region_h * out_w / out_h, width)
    region_h = region_w * out_h / out_w
    quadrant = int(rng.integers(len(QUADRANTS)))
    row, col = divmod(quadrant, 2)
    cy = _center_in_half(rng, row, region_h, height)
    cx = _center_in_half(rng, col, region_w, width)
    box = (cx - region_w / 2, cy - region_h / 2, cx + region_w / 2, cy + region_h / 2)
    image = Image.fromarray(photo).resize((out_w, out_h), Image.Resampling.BICUBIC, box=box)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue(), source * len(QUADRANTS) + quadrant


def _center_in_half(rng: np.random.Generator, half: int, extent: float, length: int) -> float:
    """A center in half `half` (0: first, 1: second) of [0, length] where a region of
    `extent` around it stays inside."""
    low = max(extent / 2, half * length / 2)
    high = min(length - extent / 2, (half + 1) * length / 2)
    return rng.uniform(low, high)


def photo_classes() -> list[str]:
    return [f"{photo}/{quadrant}" for photo in PHOTOS for quadrant in QUADRANTS]


def _photo_members(args: tuple[int, int, tuple[int, int], int]) -> Sample:
    index, seed, size, quality = args
    jpeg, label = photo_sample(index, seed, size, quality)
    return f"photo-{index:08d}", {"jpg": jpeg, "cls": str(label).encode()}


def prepare_photos(
    out: Path,
    num_samples: int,
    seed: int = 0,
    size: tuple[int, int] = (400, 350),
    quality: int = 90,
    shard_size: int = 1000,
    val_fraction: float = 0.1,
    workers: int = 1,
) -> dict[str, Manifest]:
    """`num_samples` natural-image JPEGs (see `photo_sample`) as KEY.jpg + KEY.cls,
    encoded by `workers` processes (the bytes do not depend on how many)."""

    def make(indices: np.ndarray) -> Iterator[Sample]:
        jobs = [(int(i), seed, size, quality) for i in indices]
        if pool is None:
            yield from map(_photo_members, jobs)
        else:
            yield from pool.map(_photo_members, jobs, chunksize=32)

    meta = {
        "source": "sklearn.datasets.load_sample_images (photos)",
        "classes": photo_classes(),
        "num_classes": len(photo_classes()),
        "size": list(size),
        "quality": quality,
        "seed": seed,
    }
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        return _write_splits(Path(out), make, num_samples, val_fraction, seed, shard_size, meta)
    finally:
        if pool is not None:
            pool.shutdown()


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
        raise ConfigError(f"--format={fmt} must be npy, png or jpg")
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
