"""A small split decoded once and kept in memory: a micro-batch is an index gather."""

from __future__ import annotations

import numpy as np

from ddp.data.batch import Batch, Transform, make_batch
from ddp.data.dataset import ShardDataset
from ddp.order import MicroBatch
from ddp.shards.manifest import DataError


class MemorySplit:
    """A whole split decoded once and kept in memory: a micro-batch is an index gather.

    Samples are kept as stored (uint8 images stay uint8: a quarter of float32) and go
    through the same conversion and transform as `ShardDataset.fetch`, per micro-batch,
    so order, masks and numbers do not depend on whether a split is held in memory; only
    the per-step reading goes. On the digits MLP that reading was a tenth of every step
    (bench/overhead.py). `load` declines a split with a bad or odd sample (another shape
    or dtype): the shard path judges those per micro-batch, and stays the reference.
    """

    def __init__(
        self, inputs: np.ndarray, targets: np.ndarray, transform: Transform | None, pin: bool
    ):
        self.inputs, self.targets = inputs, targets
        self.transform = transform
        self.pin_memory = pin

    @classmethod
    def load(cls, dataset: ShardDataset, pin_memory: bool = False) -> MemorySplit | None:
        inputs, targets, ok = dataset.decode(np.arange(len(dataset)))
        if not ok.all():
            return None
        if not isinstance(inputs, np.ndarray):  # decoded one by one: all alike?
            if len({(a.shape, a.dtype) for a in inputs}) != 1:
                return None
            inputs = np.stack(inputs)
        return cls(inputs, targets, dataset.transform, pin_memory)

    @staticmethod
    def fits(dataset: ShardDataset, max_mb: float) -> bool:
        """Whether the split takes at most `max_mb` MiB as stored (judged by sample 0)."""
        if max_mb <= 0 or len(dataset) == 0:
            return False
        try:
            inputs, _, _ = dataset.decode(np.zeros(1, dtype=np.int64))
        except DataError:
            return False  # decided by the normal path, which reports or skips it
        return np.asarray(inputs[0]).nbytes * len(dataset) <= max_mb * (1 << 20)

    def fetch(self, micro: MicroBatch) -> Batch:
        indices = np.asarray(micro.indices, dtype=np.int64)
        batch = make_batch(
            self.inputs[indices],
            self.targets[indices],
            ~np.asarray(micro.padded, dtype=bool),
            indices,
            transform=self.transform,
        )
        return batch.pin_memory() if self.pin_memory else batch
