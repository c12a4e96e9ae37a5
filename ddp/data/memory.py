"""A small split decoded once and kept in memory (host or GPU): a micro-batch is a gather."""

from __future__ import annotations

import numpy as np
import torch

from ddp.data.batch import Batch, Transform, make_batch
from ddp.data.dataset import ShardDataset
from ddp.errors import DataError
from ddp.order import MicroBatch


class MemorySplit:
    """A whole split decoded once and kept in memory: a micro-batch is an index gather.

    Samples are kept as stored (uint8 images stay uint8: a quarter of float32) and leave
    as the shard path hands them over, so order, masks and numbers do not depend on
    whether a split is held in memory; only the per-step reading goes. On the digits MLP
    that reading was a tenth of every step (bench/overhead.py). With `device` set (a GPU:
    data.loader.on_device) the split lives there and the gather runs there: nothing crosses the
    bus per step. `load` declines a split with a bad or odd sample (another shape or
    dtype): the shard path judges those per micro-batch, and stays the reference.
    """

    def __init__(
        self,
        inputs: np.ndarray,
        targets: np.ndarray,
        transform: Transform | None,
        pin: bool,
        device: torch.device | None = None,
    ):
        self.device = device
        self.transform = transform
        self.pin_memory = pin and device is None
        if device is not None:
            self.inputs = torch.from_numpy(np.ascontiguousarray(inputs)).to(device)
            self.targets = torch.from_numpy(targets.astype(np.int64)).to(device)
        else:
            self.inputs, self.targets = inputs, targets.astype(np.int64)

    @classmethod
    def load(
        cls, dataset: ShardDataset, pin_memory: bool = False, device: torch.device | None = None
    ) -> MemorySplit | None:
        inputs, targets, ok = dataset.decode(np.arange(len(dataset)))
        if not ok.all():
            return None
        if not isinstance(inputs, np.ndarray):  # decoded one by one: all alike?
            if len({(a.shape, a.dtype) for a in inputs}) != 1:
                return None
            inputs = np.stack(inputs)
        return cls(inputs, targets, dataset.transform, pin_memory, device)

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
        valid = ~np.asarray(micro.padded, dtype=bool)
        if self.device is not None:  # gathered where the split lives
            where = torch.from_numpy(indices).to(self.device, non_blocking=True)
            return Batch(
                inputs=self.inputs.index_select(0, where),
                targets=self.targets.index_select(0, where),
                valid=torch.from_numpy(valid).to(self.device, non_blocking=True),
                indices=torch.from_numpy(indices),
            )
        if self.transform is not None:
            batch = make_batch(
                self.inputs[indices], self.targets[indices], valid, indices, 0, self.transform
            )
        else:  # np.take into fresh memory: what make_batch would do, minus its checks
            batch = Batch(
                inputs=torch.from_numpy(np.take(self.inputs, indices, axis=0)),
                targets=torch.from_numpy(np.take(self.targets, indices)),
                valid=torch.from_numpy(valid),
                indices=torch.from_numpy(indices),
            )
        return batch.pin_memory() if self.pin_memory else batch
