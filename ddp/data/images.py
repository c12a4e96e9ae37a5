"""Image members -> augmented model inputs, decoded on the host or on the device.

`data.augment` turns on the ImageNet recipe: at training time a random-resized crop
(torchvision's algorithm: area fraction `scale`, aspect `ratio`, 10 tries, then a
center crop) and a horizontal flip; at evaluation time a center crop of `eval_crop` of
the shorter side (what "resize to size / eval_crop, center-crop size" keeps), both
resized to `size` x `size`. Every sample's crop and flip are drawn from a generator
seeded by (seed, epoch, sample index): they do not depend on the rank, the world size,
the DataLoader workers or the batch a sample lands in, so a resumed run, or one with
another worker count, sees the very same crops.

Two placements (`data.augment.placement`), both fed by `ImageAugment.fetch` in the
DataLoader workers, which reads the members and draws the crops (this module; the
device's half is ddp.data.device_jpeg):

- `host`: the workers decode (libjpeg-turbo through simplejpeg, else Pillow), at 1/2,
  1/4 or 1/8 scale (libjpeg's DCT scaling) when the crop is that many times the output
  size, cut the crop and resize it with torch's uint8 antialiased bilinear kernel;
  uint8 HWC crops cross the bus, and `ddp.data.device.InputPipeline` normalises them
  on the device. Such a crop is moved onto the grid of its scale (by less than half a
  step), so the reduced decode holds exactly its pixels, in both placements.
- `device`: the workers only check each JPEG's header and pack the bytes (`Jpegs`);
  on a GPU the whole micro-batch is decoded by nvJPEG (`torchvision.io.decode_jpeg`,
  batched, on the hardware decoder where the GPU has one) and cropped, resized and
  flipped there (`augment_decoded`). On a CPU-only run the same path decodes with
  Pillow in the training process and runs the same crop code, so it can be tested.

The two placements cut the same crops; their pixels differ by rounding (uint8 crops on
the host, float on the device) and by the decoders' own rounding.
"""

from __future__ import annotations

import functools
import io
import math
import types
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ddp.data.batch import Batch, Jpegs, Transform, make_batch
from ddp.data.samples import describe
from ddp.errors import DataError

Placement = Literal["host", "device"]

_STREAM = 0x617567
"""The second word of every augmentation key: its draws share no stream with others."""
_TRIES = 10
"""Random-resized-crop attempts before the center-crop fallback (as torchvision)."""


class Crop(NamedTuple):
    """A region of the full image (pixels) and whether it is mirrored."""

    top: int
    left: int
    height: int
    width: int
    flip: bool
    reduce: int = 1
    """1, 2, 4 or 8: the region is at least `reduce` times the output size and aligned
    to multiples of `reduce`, so a JPEG decoded at 1/reduce scale (libjpeg's DCT
    scaling) holds exactly this region, at a fraction of the decoding cost."""


def reducible(
    box: tuple[int, int, int, int], height: int, width: int, size: int
) -> tuple[tuple[int, int, int, int], int]:
    """`box` (top, left, h, w) and the largest reduction it allows: the box moved to
    multiples of it (by less than half of it per edge, inside the image), still at least
    `size` times it tall and wide."""
    top, left, h, w = box
    for reduce in (8, 4, 2):
        if min(h, w) < reduce * size:
            continue
        t, lt, b, r = (int(math.floor(v / reduce + 0.5)) for v in (top, left, top + h, left + w))
        b, r = min(b, height // reduce), min(r, width // reduce)
        if min(b - t, r - lt) >= size:
            return (t * reduce, lt * reduce, (b - t) * reduce, (r - lt) * reduce), reduce
    return box, 1


def random_resized_crop(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawn from `rng`: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(_TRIES):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    aspect = width / height  # fallback: the largest center crop within the ratio range
    if aspect < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif aspect > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop(height: int, width: int, fraction: float) -> tuple[int, int, int, int]:
    """The centered square of `fraction` of the shorter side: (top, left, h, w)."""
    side = max(1, int(round(min(height, width) * fraction)))
    return (height - side) // 2, (width - side) // 2, side, side


# ----------------------------------------------------------------------------- JPEG headers

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
"""Start-of-frame markers (they carry the image size); C4, C8 and CC are not frames."""


def jpeg_size(data: bytes | memoryview) -> tuple[int, int]:
    """(height, width) from a JPEG's frame header, after checking that the stream is
    complete: ValueError for anything else (not a JPEG, a cut header, no end marker
    after the scan, i.e. a truncated file). Reads the headers only, not the image."""
    data = bytes(data)
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG (no start-of-image marker)")
    pos, size = 2, None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError(f"corrupt JPEG header (no marker at byte {pos})")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _SOF and pos + 9 <= len(data):
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            size = height, int.from_bytes(data[pos + 7 : pos + 9], "big")
        if marker == 0xDA:  # start of scan: the entropy-coded data follows
            if size is None or min(size) < 1:
                raise ValueError("corrupt JPEG header (no frame size before the scan)")
            if data.find(b"\xff\xd9", pos) < 0:  # 0xFF in scan data is always stuffed
                raise ValueError("truncated JPEG (no end-of-image marker)")
            return size
        pos += 2 + length
    raise ValueError("truncated JPEG header")


# ----------------------------------------------------------------------------- host

Draw = Callable[[int, int], Crop]
"""(height, width) of the full image -> the crop to cut from it."""


def decode_on_host(data: bytes | memoryview, draw: Draw, size: int) -> np.ndarray:
    """One image member -> its crop, resized to (size, size, 3) uint8; `draw(height,
    width)` gives the crop. A JPEG whose crop allows it (`Crop.reduce`) is decoded at
    1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling).

    JPEGs go to libjpeg-turbo through simplejpeg where it is installed (straight into a
    numpy array: no Pillow header parsing, RGBX unpacking or copy out), anything else
    and any stream it refuses to Pillow, which decodes the same pixels (tested) and is
    the judge of what is corrupt."""
    turbo = _simplejpeg()
    if turbo is not None and data[:2] == b"\xff\xd8":
        try:
            return _decode_turbo(turbo, data, draw, size)
        except ValueError:
            pass  # strict where libjpeg only warns: Pillow decides
    return _decode_pillow(data, draw, size)


@functools.cache
def _simplejpeg() -> types.ModuleType | None:
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def _decode_turbo(turbo: types.ModuleType, data: bytes | memoryview, draw: Draw, size: int):
    height, width, _, _ = turbo.decode_jpeg_header(data)
    crop = draw(height, width)
    image = turbo.decode_jpeg(
        data,
        colorspace="RGB",
        min_height=-(-height // crop.reduce),
        min_width=-(-width // crop.reduce),
        min_factor=crop.reduce,
    )
    scale = crop.reduce if image.shape[1] != width else 1  # reduced as asked, or not at all
    top, left, bottom, right = _edges(crop, scale)
    return _resize_host(image[top:bottom, left:right], size, crop.flip)


def _decode_pillow(data: bytes | memoryview, draw: Draw, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        crop = draw(height, width)
        scale = 1
        if crop.reduce > 1 and image.format == "JPEG":
            drafted = image.draft("RGB", (width // crop.reduce, height // crop.reduce))
            if drafted is not None:  # Pillow picks the very scale asked for here
                scale = crop.reduce
        if image.mode != "RGB":
            image = image.convert("RGB")
        top, left, bottom, right = _edges(crop, scale)
        region = np.array(image.crop((left, top, right, bottom)))  # writable, for torch
    return _resize_host(region, size, crop.flip)


def _edges(crop: Crop, scale: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of `crop` in the image decoded at 1/scale (exact: a
    reduced crop is aligned to its reduction)."""
    assert crop.reduce % scale == 0, (crop, scale)
    return (
        crop.top // scale,
        crop.left // scale,
        (crop.top + crop.height) // scale,
        (crop.left + crop.width) // scale,
    )


def _resize_host(region: np.ndarray, size: int, flip: bool) -> np.ndarray:
    """(h, w, 3) uint8 -> (size, size, 3) uint8, mirrored if asked. torch's antialiased
    uint8 bilinear kernel on the channels-last view matches Pillow's BILINEAR resize to
    a level or so, in about a quarter of its time (0.4 against 1.7 ms for 290x270 ->
    224x224 on the development machine)."""
    if region.shape[:2] != (size, size):
        # NHWC memory seen as NCHW (batch dimension first, so torch takes it for
        # channels-last): the kernel reads and writes it without a transposing copy.
        nhwc = torch.from_numpy(np.ascontiguousarray(region)).unsqueeze(0)
        resized = F.interpolate(
            nhwc.permute(0, 3, 1, 2), size=(size, size), mode="bilinear", antialias=True
        )
        region = resized[0].permute(1, 2, 0).numpy()
    return region[:, ::-1] if flip else region


# ----------------------------------------------------------------------------- the hook


class Members(Protocol):
    """What `ImageAugment` reads a micro-batch from (ddp.data.dataset.ShardDataset)."""

    input_key: str
    on_error: str
    transform: Transform | None
    num_errors: int

    def labels(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def input_member(self, index: int) -> memoryview | bytes: ...

    def sample_name(self, index: int) -> str: ...


@dataclass(frozen=True)
class ImageAugment:
    """How a split's image members become inputs (data.augment), for training or evaluation.

    `ShardDataset.fetch` hands it whole micro-batches: it reads the members, draws each
    sample's crop from (seed, epoch, index), and decodes them here (host) or packs them
    for the device (device).
    """

    size: int
    train: bool
    seed: int = 0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    eval_crop: float = 0.875
    placement: Placement = "host"

    def crop(self, height: int, width: int, index: int, epoch: int) -> Crop:
        """Sample `index`'s crop in `epoch`: random (training) or central (evaluation)."""
        if not self.train:
            box, flip = center_crop(height, width, self.eval_crop), False
        else:
            # Philox is counter-based: keyed by the seed, its counter starting at (index,
            # epoch) in the high words, every sample of every epoch has a stream of its own.
            bits = np.random.Philox(counter=[0, 0, index, epoch], key=[self.seed, _STREAM])
            rng = np.random.Generator(bits)
            box = random_resized_crop(rng, height, width, self.scale, self.ratio)
            flip = bool(self.flip and rng.random() < 0.5)
        box, reduce = reducible(box, height, width, self.size)
        return Crop(*box, flip, reduce)

    def fetch(self, dataset: Members, indices: np.ndarray, padded: np.ndarray, epoch: int) -> Batch:
        """One micro-batch of `dataset`, its inputs decoded (host) or packed (device)."""
        targets, ok = dataset.labels(indices)
        if self.placement == "host":
            inputs = np.zeros((len(indices), self.size, self.size, 3), dtype=np.uint8)
            for i, index in enumerate(indices.tolist()):
                ok[i] &= self._decode(dataset, index, epoch, inputs[i])
            jpegs = None
        else:
            jpegs = self._pack(dataset, indices, epoch, ok)
            inputs = np.zeros((len(indices), 0), dtype=np.uint8)
        bad = int((~ok).sum())
        dataset.num_errors += bad
        targets = np.where(ok, targets, 0)
        if jpegs is None:
            return make_batch(inputs, targets, ok & ~padded, indices, bad, dataset.transform)
        return replace(make_batch(inputs, targets, ok & ~padded, indices, bad), jpegs=jpegs)

    def _decode(self, dataset: Members, index: int, epoch: int, out: np.ndarray) -> bool:
        def draw(height: int, width: int) -> Crop:
            return self.crop(height, width, index, epoch)

        try:
            out[...] = decode_on_host(dataset.input_member(index), draw, self.size)
            return True
        except Exception as err:  # noqa: BLE001 - any decode failure is bad data
            self._bad(dataset, index, err)
            return False

    def _pack(self, dataset: Members, indices: np.ndarray, epoch: int, ok: np.ndarray) -> Jpegs:
        """The members back to back after a header check (a bad one is left empty), and
        their crops."""
        members: list[memoryview | bytes] = []
        crops = np.zeros((len(indices), 5), dtype=np.int64)
        for i, index in enumerate(indices.tolist()):
            member = b""
            if ok[i]:
                try:
                    member = dataset.input_member(index)
                    crops[i] = self.crop(*jpeg_size(member), index, epoch)[:5]
                except Exception as err:  # noqa: BLE001 - any failure is bad data
                    self._bad(dataset, index, err)
                    ok[i], member = False, b""
            members.append(member)
        offsets = np.zeros(len(members) + 1, dtype=np.int64)
        np.cumsum([len(m) for m in members], out=offsets[1:])
        data = np.empty(int(offsets[-1]), dtype=np.uint8)
        for member, lo in zip(members, offsets[:-1].tolist(), strict=True):
            data[lo : lo + len(member)] = np.frombuffer(member, dtype=np.uint8)
        return Jpegs(
            data=torch.from_numpy(data),
            offsets=torch.from_numpy(offsets),
            crops=torch.from_numpy(crops),
            size=self.size,
            names=tuple(dataset.sample_name(i) for i in indices.tolist()),
            on_error=dataset.on_error,
        )

    def _bad(self, dataset: Members, index: int, err: Exception) -> None:
        if dataset.on_error == "raise":
            message = f"undecodable .{dataset.input_key}: {describe(err)}"
            raise DataError(f"{dataset.sample_name(index)}: {message}") from err
