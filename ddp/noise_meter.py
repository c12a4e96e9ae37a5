"""The noise scale's measurement during training: squared gradient norms summed on the
device, the estimate (ddp.noise_scale) made from their means at each epoch's end."""

from __future__ import annotations

from typing import Any

import torch

from ddp.distributed import collectives
from ddp.distributed.group import DistEnv
from ddp.noise_scale import NoiseEstimate, estimate


class NoiseMeter:
    """The epoch's squared gradient norms at both batch sizes, summed on the device (no
    host sync per step), and the estimate from their means at the epoch's end.

    Data-parallel (world > 1): per step, this rank's gradient before the all-reduce (b =
    micro_size x accumulate samples) and the averaged one after it (B = the global
    batch), both read by the communication hook bucket by bucket (ddp.distributed.step_sums),
    so no extra pass over the gradients and no extra collective: the ranks' sums meet in
    one all_reduce per epoch. One process with accumulation: each micro-batch's gradient
    (b = micro_size, its difference to the accumulated one before it) and the step's
    (B = the global batch). Only steps whose every sample is real count: a step with
    padding or skipped bad samples (fewer valid samples than the global batch) or a
    non-finite loss is left out, so neither biases the estimate.
    """

    def __init__(self, small: int, big: int, population: int, device: torch.device) -> None:
        self.small, self.big, self.population = small, big, population
        self._sums = torch.zeros(3, dtype=torch.float64, device=device)
        """[sum of |g_small|² over this rank's counted steps, of |g_big|², counted steps]"""

    def book(self, norms: torch.Tensor, counted: torch.Tensor) -> None:
        """Add a step's float64 [|g_small|² (the mean over its small batches), |g_big|²] to
        the epoch's sums if `counted` (a device bool: every sample real, the loss finite).
        A few device ops, no host sync: the step's cost stays within noise."""
        weight = counted.to(torch.float64)
        self._sums[:2].add_(norms * weight)
        self._sums[2].add_(weight)

    def state(self, env: DistEnv) -> dict[str, Any]:
        """The unfinished epoch's sums over all ranks (every rank calls it), for a checkpoint."""
        summed = collectives.all_reduce_sum(self._sums.clone(), env).cpu()
        return {"small": self.small, "big": self.big, "sums": summed}

    def resume(self, state: dict[str, Any] | None, env: DistEnv) -> None:
        """Continue the sums of the checkpoint's unfinished epoch (held by rank 0 alone,
        since they are summed over ranks), when its batch sizes are this run's."""
        saved = state.get("noise") if state else None
        mid_epoch = state is not None and state["position"]["step_in_epoch"] > 0
        same = saved is not None and (saved["small"], saved["big"]) == (self.small, self.big)
        if mid_epoch and same and env.is_main:
            self._sums.copy_(saved["sums"])

    def finish_epoch(self, env: DistEnv) -> NoiseEstimate | None:
        """The epoch's estimate (None when no step counted); every rank calls it (one
        all_reduce)."""
        summed = collectives.all_reduce_sum(self._sums.clone(), env).tolist()
        self._sums.zero_()
        ranks_small, ranks_big, ranks_steps = summed
        if ranks_steps <= 0:
            return None
        # Every rank counted the same steps: the big sums are world_size copies of one value.
        small_sq, big_sq = ranks_small / ranks_steps, ranks_big / ranks_steps
        return estimate(small_sq, big_sq, self.small, self.big, self.population)


def meter_for(
    micro_size: int,
    accumulate: int,
    world_size: int,
    num_samples: int,
    device: torch.device,
) -> NoiseMeter | None:
    """The meter for a run's plan, or None when it has one batch size only (one process
    without accumulation: each step's gradient is the only one there is)."""
    small = micro_size * accumulate if world_size > 1 else micro_size
    big = micro_size * accumulate * world_size
    if small >= big:
        return None
    return NoiseMeter(small, big, num_samples, device)


NOT_MEASURED = (
    "noise scale: not measured (one process without accumulation has one batch size "
    "only; run 2 processes, or a batch.micro_size below batch.global_size)"
)
