"""What a loader hands the trainer, and the contract every training loader meets."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch

from ddp.data_config import LoaderConfig

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Jpegs:
    """A micro-batch of JPEGs as stored, to be decoded and augmented on the device
    (placement=device). The bytes stay on the host: nvJPEG reads them from there."""

    data: torch.Tensor
    """uint8 (total,): every sample's member, back to back."""
    offsets: torch.Tensor
    """int64 (B + 1,): sample i is data[offsets[i]:offsets[i + 1]] (empty: a bad sample)."""
    crops: torch.Tensor
    """int64 (B, 5): top, left, height, width, flip in the full image."""
    size: int
    """Output side in pixels."""
    names: tuple[str, ...]
    """'SHARD: key KEY' per sample: a sample the device cannot decode is named by it."""
    on_error: str = "raise"

    def pin_memory(self) -> Jpegs:
        return replace(self, data=self.data.pin_memory())


@dataclass
class Batch:
    """One micro-batch. Loaders hand it over with the inputs as stored (uint8 images stay
    uint8, HWC); `ddp.data.device.InputPipeline` makes them model inputs on the device."""

    inputs: torch.Tensor
    """(B, ...): as stored (e.g. uint8 (B,H,W,C)), or float32 CHW in [0, 1] after a
    per-sample transform (which runs on the host) or the input pipeline."""
    targets: torch.Tensor
    """int64 class labels, (B,)."""
    valid: torch.Tensor
    """bool (B,): False for padding repeats and skipped bad samples; metrics drop these."""
    indices: torch.Tensor
    """int64 (B,): the samples' indices in the split (manifest order), -1 where unknown.
    They stay on the host (only the sample audit reads them)."""
    num_skipped: int = 0
    """Bad samples replaced in this batch (on_error="skip")."""
    jpegs: Jpegs | None = None
    """Images still encoded, for the device to decode and augment (data.augment.placement
    =device); `inputs` is empty until `InputPipeline` fills it."""

    def __len__(self) -> int:
        return len(self.targets)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        """The batch on `device` (a copy of what trains; the indices stay on the host)."""
        if self.inputs.device == torch.device(device):
            return self
        return replace(
            self,
            inputs=self.inputs.to(device, non_blocking=non_blocking),
            targets=self.targets.to(device, non_blocking=non_blocking),
            valid=self.valid.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self, device: Any = None) -> Batch:
        """Page-locked host memory, so the copy to a GPU overlaps compute (DataLoader's
        pin-memory thread calls this with pin_memory=True)."""
        return replace(
            self,
            inputs=self.inputs.pin_memory(),
            targets=self.targets.pin_memory(),
            valid=self.valid.pin_memory(),
            jpegs=self.jpegs.pin_memory() if self.jpegs is not None else None,
        )


def to_model_input(inputs: torch.Tensor) -> torch.Tensor:
    """uint8 images (B,H,W,C) or (B,H,W) -> float32 (B,C,H,W) in [0,1]; others as float32.

    Where it runs decides the speed: on a GPU, after the uint8 bytes crossed the bus
    (a quarter of float32's), it costs next to nothing; on the host, before the copy, it
    halved a ResNet-18's samples/s on an H200 (issue 12).
    """
    if inputs.dtype != torch.uint8:
        return inputs if inputs.dtype == torch.float32 else inputs.to(torch.float32)
    if inputs.dim() == 3:
        inputs = inputs.unsqueeze(-1)
    if inputs.dim() != 4:
        return inputs.to(torch.float32)
    # Transpose while the elements are 1 byte, then convert contiguously: about
    # twice as fast on a CPU as one strided uint8 -> float32 copy.
    return inputs.permute(0, 3, 1, 2).contiguous().to(torch.float32).mul_(1.0 / 255.0)


def make_batch(
    inputs: np.ndarray | list[np.ndarray],
    targets: np.ndarray,
    valid: np.ndarray,
    indices: np.ndarray,
    num_skipped: int = 0,
    transform: Transform | None = None,
) -> Batch:
    """Decoded samples as a Batch: inputs as stored, or (with a per-sample transform,
    which expects float CHW tensors) converted and transformed here, on the host."""
    array = inputs if isinstance(inputs, np.ndarray) else np.stack(inputs)
    if not array.flags.writeable:  # a view of a shard's map: torch wants its own memory
        array = array.copy()
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if transform is not None:
        tensor = torch.stack([transform(x) for x in to_model_input(tensor)])
    return Batch(
        inputs=tensor,
        targets=torch.from_numpy(np.asarray(targets, dtype=np.int64)),
        valid=torch.from_numpy(np.asarray(valid, dtype=bool)),
        indices=torch.from_numpy(np.asarray(indices, dtype=np.int64)),
        num_skipped=num_skipped,
    )


PLAIN = LoaderConfig(
    num_workers=0,
    pin_memory=False,
    prefetch_factor=2,
    on_error="raise",
    in_memory_max_mb=256.0,
    on_device=False,
)
"""`data.loader` for code that builds loaders itself (tests, benchmarks): one process,
pageable memory, a split that fits held in host memory. The trainer's come from conf/."""


@dataclass
class LoaderOptions:
    """How to load: `data.loader` as it is, the device batches train on, and what the
    rest of the config says about reading samples."""

    loader: LoaderConfig = field(default_factory=lambda: replace(PLAIN))
    """data.loader: workers, pinning, bad samples, in-memory splits (checked there)."""
    device: torch.device | None = None
    """The device the batches train on (None: the host): pinning and data.loader.on_device
    take effect on a GPU only."""
    persistent_workers: bool = True
    """Keep workers (and their open shards) between epochs; ignored with 0 workers."""
    input_key: str = "npy"
    """Member extension holding the input (npy, png, jpg, ...); `jpg;png`: the first present."""
    target_key: str = "cls"
    """Member holding the label: an extension (`cls`), alternatives (`cls;txt`), or a
    JSON member's field (`json:label`); see ddp.data.samples.LabelKey."""
    classes: list[str] | None = None
    """Class names, in id order, for labels given as names (else the manifest's)."""
    num_classes: int | None = None
    """Labels must lie in [0, num_classes): one outside is bad data (raise or skip)."""
    window_shards: int | None = None
    """The training order: None shuffles all samples; k shuffles the shards, then the
    samples within windows of k shards (`ddp.order.ShardWindows`: remote splits with a
    cache smaller than the split)."""

    @property
    def on_gpu(self) -> bool:
        return self.device is not None and self.device.type == "cuda"

    @property
    def pin_memory(self) -> bool:
        """Page-locked host batches: data.loader.pin_memory, on a GPU."""
        return self.loader.pin_memory and self.on_gpu

    @property
    def memory_device(self) -> torch.device | None:
        """Where a split held in memory lives: the GPU with data.loader.on_device (then a
        micro-batch is a gather there, and nothing crosses the bus per step), else None
        (the host)."""
        return self.device if self.loader.on_device and self.on_gpu else None


class TrainBatches(Protocol):
    """What the training loop reads: one rank's micro-batches, epoch by epoch.

    `epoch(e, start_step)` yields exactly (iterations_per_epoch - start_step) * accumulate
    micro-batches on every rank, whatever the data: the guarantee that keeps DDP from
    hanging. Both the indexed `TrainLoader` and the streaming `StreamLoader` meet it.
    """

    indexed: bool
    """Whether `Batch.indices` name the samples (an audit of coverage needs them)."""
    memory: Any
    """The split held in this process's memory (ddp.data.memory.MemorySplit), or None:
    read from its shards (what helps a loader that keeps the run waiting differs)."""

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]: ...

    def close(self) -> None:
        """Stop DataLoader workers now (persistent ones otherwise live with the loader)."""
