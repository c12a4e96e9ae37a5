"""A batch's way onto the device: the bytes as stored cross the bus, the work happens there.

- `InputPipeline`: uint8 images -> float CHW in [0, 1], per-channel normalisation, the
  model's memory order; on the device, after the copy. JPEGs still encoded
  (data.augment.placement=device) are decoded and cropped there first (ddp.data.images).
- `Prefetcher`: on a GPU, the next micro-batch is copied (from pinned memory) and put
  through the pipeline on a side stream while the current one computes, the pattern of
  timm's PrefetchLoader; elsewhere it simply applies the pipeline.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch

from ddp.data.batch import Batch, to_model_input
from ddp.data.device_jpeg import decode_jpegs


class InputPipeline:
    """Batch (inputs as stored, anywhere) -> Batch on `device`, ready for the model."""

    def __init__(
        self,
        device: torch.device,
        channels_last: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        self.device, self.channels_last = device, channels_last
        self.mean = self.std = None
        if mean is not None and std is not None:
            self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
            self.std = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, batch: Batch) -> Batch:
        batch = batch.to(self.device)
        if batch.jpegs is not None:  # data.augment.placement=device: decoded here
            batch = decode_jpegs(batch, self.device)
        inputs = to_model_input(batch.inputs)
        if self.mean is not None and inputs.dim() == 4:
            inputs = (inputs - self.mean) / self.std
        if self.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return replace(batch, inputs=inputs)


class Prefetcher:
    """Device batches from host batches, one micro-batch ahead on a side CUDA stream.

    The side stream copies and converts batch k+1 while the default stream computes
    batch k; `wait_stream` orders the hand-over, `record_stream` keeps the caching
    allocator from reusing a handed-over tensor while the default stream still reads it.
    """

    def __init__(self, batches: Iterator[Batch], pipeline: InputPipeline) -> None:
        self.batches, self.pipeline = batches, pipeline
        cuda = pipeline.device.type == "cuda"
        self.stream = torch.cuda.Stream(pipeline.device) if cuda else None
        self._next: Batch | None = None
        if self.stream is not None:
            self._preload()

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Batch:
        if self.stream is None:
            return self.pipeline(next(self.batches))
        if self._next is None:
            raise StopIteration
        current = torch.cuda.current_stream(self.pipeline.device)
        current.wait_stream(self.stream)
        batch = self._next
        for tensor in (batch.inputs, batch.targets, batch.valid):
            tensor.record_stream(current)
        self._preload()
        return batch

    def _preload(self) -> None:
        try:
            host = next(self.batches)
        except StopIteration:
            self._next = None
            return
        with torch.cuda.stream(self.stream):
            self._next = self.pipeline(host)
