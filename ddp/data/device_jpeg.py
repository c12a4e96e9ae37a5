"""JPEGs decoded and augmented on the device (data.augment.placement=device).

The DataLoader workers pack a micro-batch's JPEG bytes and crops (`Jpegs`, drawn by
ddp.data.images.ImageAugment); here a GPU decodes the whole micro-batch with nvJPEG
(`torchvision.io.decode_jpeg`, batched) and crops, resizes and flips it. On a CPU-only
run the same path decodes with Pillow in the training process and runs the same crop
code, so it can be tested.
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from ddp.data.batch import Batch, Jpegs
from ddp.data.samples import describe
from ddp.errors import ConfigError, DataError


def check_device_decoder(device: torch.device) -> None:
    """ConfigError unless `device` decodes JPEGs: on a GPU, torchvision's nvJPEG is tried
    on a small image at start-up, so a torchvision without it (or built for another
    torch) is reported as such, not blamed on the first sample."""
    if device.type != "cuda":
        return  # Pillow, in the training process
    try:
        from PIL import Image
        from torchvision.io import ImageReadMode, decode_jpeg

        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 100, 50)).save(buffer, format="JPEG")
        probe = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        decode_jpeg([probe], mode=ImageReadMode.RGB, device=device)
    except Exception as err:  # noqa: BLE001 - missing, built for another torch, no nvJPEG
        raise ConfigError(
            "data.augment.placement=device needs torchvision's nvJPEG decoder on this GPU "
            f"(torchvision.io.decode_jpeg): {describe(err)}"
        ) from err


def decode_jpegs(batch: Batch, device: torch.device) -> Batch:
    """A Batch whose `jpegs` are decoded and augmented on `device`: float (B, 3, S, S) in
    [0, 1]. A sample that fails to decode raises a DataError naming it, or (on_error=skip)
    comes out zeros and invalid, counted in num_skipped."""
    jpegs = batch.jpegs
    assert jpegs is not None
    bounds = jpegs.offsets.tolist()
    members = [jpegs.data[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    decoded = _decode_batched(members, device) if device.type == "cuda" else None
    if decoded is None:  # one by one: on a CPU, or to find the culprit of a failed batch
        decoded = [_decode_one(m, device, jpegs, i) for i, m in enumerate(members)]
    failed = [i for i, m in enumerate(members) if m.numel() and decoded[i] is None]
    inputs = augment_decoded(decoded, jpegs.crops, jpegs.size, device)
    valid = batch.valid
    if failed:  # (empty members were judged in the worker: already invalid and counted)
        keep = torch.ones(len(members), dtype=torch.bool)
        keep[failed] = False
        valid = valid & keep.to(valid.device)
    skipped = batch.num_skipped + len(failed)
    return replace(batch, inputs=inputs, valid=valid, jpegs=None, num_skipped=skipped)


def _decode_batched(members: list[torch.Tensor], device: torch.device) -> list | None:
    """The micro-batch through nvJPEG in one call (None where a member is empty), or
    None when some member fails."""
    from torchvision.io import ImageReadMode, decode_jpeg

    todo = [i for i, m in enumerate(members) if m.numel()]
    decoded: list[torch.Tensor | None] = [None] * len(members)
    if not todo:
        return decoded
    try:
        images = decode_jpeg([members[i] for i in todo], mode=ImageReadMode.RGB, device=device)
    except Exception:  # noqa: BLE001 - which one failed is found one by one
        return None
    for i, image in zip(todo, images, strict=True):
        decoded[i] = image
    return decoded


def _decode_one(
    member: torch.Tensor, device: torch.device, jpegs: Jpegs, i: int
) -> torch.Tensor | None:
    """One member as uint8 (3, H, W) on `device`; None for an empty (already bad) one or,
    with on_error=skip, one that does not decode."""
    if not member.numel():
        return None
    try:
        if device.type == "cuda":
            from torchvision.io import ImageReadMode, decode_jpeg

            return decode_jpeg(member, mode=ImageReadMode.RGB, device=device)
        from PIL import Image

        with Image.open(io.BytesIO(member.numpy())) as image:
            array = np.asarray(image.convert("RGB"))
        return torch.from_numpy(array.copy()).permute(2, 0, 1).to(device)
    except Exception as err:  # noqa: BLE001 - any decode failure is bad data
        if jpegs.on_error == "raise":
            raise DataError(f"{jpegs.names[i]}: undecodable JPEG: {describe(err)}") from err
        return None


def augment_decoded(
    images: list[torch.Tensor | None], crops: torch.Tensor, size: int, device: torch.device
) -> torch.Tensor:
    """Decoded uint8 (3, H, W) images (None: a blank) -> float (B, 3, size, size) in
    [0, 1]: each crop resized (antialiased bilinear) and mirrored where asked. Runs
    wherever the images are: on the GPU after nvJPEG, on a CPU in tests."""
    out = torch.zeros((len(images), 3, size, size), dtype=torch.float32, device=device)
    for i, (image, crop) in enumerate(zip(images, crops.tolist(), strict=True)):
        if image is None:
            continue
        top, left, height, width, flip = crop
        region = image[:, top : top + height, left : left + width].unsqueeze(0).float()
        if (height, width) != (size, size):
            region = F.interpolate(region, size=(size, size), mode="bilinear", antialias=True)
        out[i] = region[0].flip(-1) if flip else region[0]
    return out.mul_(1.0 / 255.0)
