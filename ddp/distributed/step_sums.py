"""Per-step numbers every rank needs summed over all ranks, carried by the gradient all-reduce.

The training step's loss, hits and sample count, and the flags that steer the loop
(preempt, save, skipped samples) would otherwise take a collective of their own each
step; riding on the first gradient bucket they cost nothing extra.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ddp.distributed.collectives import all_reduce_sum
from ddp.distributed.group import DistEnv


class StepSums:
    """Per-step numbers every rank needs summed over all ranks, carried by the step's own
    gradient all-reduce instead of a collective of their own.

    Two kinds of values: device ones (a 1-D tensor, e.g. loss sum, correct, samples: no
    host sync to hand them over) set by the training step before its synchronizing
    backward, and host ones (counts, and flags such as "preempt" where a sum > 0 means
    "some rank raised it"). A DDP communication hook appends them to the first gradient
    bucket (DDP's smallest, 1 MiB at most) of each synchronizing backward; `no_sync`
    micro-batches reduce nothing. Gradients are averaged as DDP's default hook does
    (divide by the world size, then sum). Without a process group the sums are this
    process's own. With these sums in an all-reduce of their own, the digits MLP on 2
    CPU processes ran at 0.72x the steps/s (bench/overhead.py --candidate).
    """

    def __init__(
        self,
        env: DistEnv,
        ddp_model: Any = None,
        device_keys: tuple[str, ...] = (),
        host_keys: tuple[str, ...] = (),
    ):
        self.device_keys, self.host_keys = device_keys, host_keys
        self._env = env
        self._device_values = torch.zeros(len(device_keys), device=env.device)
        self._host_values = [0.0] * len(host_keys)
        self._host_tensor = torch.zeros(len(host_keys), device=env.device)
        self._reduced: torch.Tensor | None = None
        """Set by the hook: the sums rode on this step's gradients."""
        self.sq_norms: torch.Tensor | None = None
        """With `track_norms()`: [this rank's gradient's squared norm before the average,
        the averaged gradient's after it], summed by the hook over the step's buckets."""
        self.on_bucket: Callable[[], None] | None = None
        """Called by the hook as each bucket's gradients are ready (ddp.perf's timer: the
        last call of a step ends its compute; what follows is the wait for communication)."""
        if env.distributed and ddp_model is not None:
            ddp_model.register_comm_hook(self, _all_reduce_with_sums)

    def track_norms(self) -> None:
        """Have the hook also measure the gradients' squared norms (for the noise scale)."""
        self.sq_norms = torch.zeros(2, dtype=torch.float64, device=self._env.device)

    @property
    def tracks_norms(self) -> bool:
        return self.sq_norms is not None

    def set_host(self, **values: float) -> None:
        """This rank's host values, before the step (copied to the device now, so the
        hook inside backward never waits for a host-to-device copy)."""
        for key, value in values.items():
            self._host_values[self.host_keys.index(key)] = float(value)
        host = torch.tensor(self._host_values, dtype=torch.float32)
        if self._env.device.type == "cuda":
            host = host.pin_memory().to(self._env.device, non_blocking=True)
        self._host_tensor = host

    def set_device(self, values: torch.Tensor) -> None:
        """This rank's device values, in `device_keys` order, before the last backward."""
        self._device_values = values

    def _packed(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.cat([self._device_values.to(dtype), self._host_tensor.to(dtype)])

    @property
    def keys(self) -> tuple[str, ...]:
        return self.device_keys + self.host_keys

    def reduced(self) -> torch.Tensor:
        """Every value summed over the ranks, in `keys` order, on the device (no host
        sync); clears them for the next step."""
        if self._reduced is not None:
            summed = self._reduced
        else:  # no process group, or a backward that reduced no gradient: sum alone
            summed = all_reduce_sum(self._packed(torch.float32), self._env)
        self._reduced = None
        self._host_values = [0.0] * len(self.host_keys)
        self._host_tensor = torch.zeros(len(self.host_keys), device=self._env.device)
        return summed

    def result(self) -> dict[str, float]:
        """`reduced()` read on the host, by key."""
        return dict(zip(self.keys, self.reduced().tolist(), strict=True))


def _all_reduce_with_sums(sums, bucket):  # unannotated: DDP checks annotations as objects
    """DDP comm hook (state: the StepSums, bucket: a dist.GradBucket) -> Future[Tensor]."""
    if sums.on_bucket is not None:
        sums.on_bucket()
    grads = bucket.buffer()
    norms = sums.sq_norms
    if norms is not None:  # this rank's own gradient, before the average replaces it
        norms[0] += _sq_norm(grads)
    grads.div_(dist.get_world_size())
    n = grads.numel()
    # (half-precision gradients would round the sums: they take the fallback)
    riding = bucket.index() == 0 and grads.dtype in (torch.float32, torch.float64)
    packed = torch.cat([grads, sums._packed(grads.dtype)]) if riding else grads

    def unpack(fut: torch.futures.Future) -> torch.Tensor:
        reduced = fut.value()[0]
        if riding:
            sums._reduced = reduced[n:].float()
        if norms is not None:
            norms[1] += _sq_norm(reduced[:n])
        return reduced[:n]  # the gradients must come first: DDP reads them from offset 0

    return dist.all_reduce(packed, async_op=True).get_future().then(unpack)


def _sq_norm(values: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(values, dtype=torch.float64).square()
