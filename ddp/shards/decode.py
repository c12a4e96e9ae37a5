"""Decode one tar member by its extension (webdataset's conventions).

The loader batches the common cases itself (same-header npy, cls); these
per-member decoders are its fallback and what `ddp-shards verify` runs.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np

IMAGE_EXTS = ("jpg", "jpeg", "png", "ppm", "bmp", "webp")
LABEL_EXTS = ("cls", "cls2", "index", "idx", "label")


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_label(data: bytes) -> int:
    return int(data.strip())


def decode_text(data: bytes) -> str:
    return data.decode("utf-8")


def decode_json(data: bytes) -> Any:
    return json.loads(data)


def decode_image(data: bytes) -> np.ndarray:
    """uint8 HxWxC (grayscale and palette images become HxWx1 / RGB)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("L", "RGB", "RGBA"):
            image = image.convert("RGB")
        array = np.asarray(image)
    return array[:, :, None] if array.ndim == 2 else array


DECODERS: dict[str, Callable[[bytes], Any]] = {
    "npy": decode_npy,
    "json": decode_json,
    "txt": decode_text,
    **{ext: decode_label for ext in LABEL_EXTS},
    **{ext: decode_image for ext in IMAGE_EXTS},
}


def decode_member(ext: str, data: bytes) -> Any:
    """Decode by the last part of the extension (`seg.png` decodes as png); raw bytes
    for extensions without a decoder."""
    decoder = DECODERS.get(ext.rsplit(".", 1)[-1].lower())
    return decoder(data) if decoder else data
