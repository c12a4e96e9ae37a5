"""The epoch order: which sample every rank consumes at every micro-step.

Pure functions of (plan, seed, epoch, rank): no process group, no data, no
DataLoader workers. Every rank computes the same global sequence for an epoch and
takes its own slice of each global batch, so

- every sample is used exactly once per epoch (plus padding, or minus the
  dropped remainder with drop_last),
- every rank gets exactly `plan.micro_batches_per_epoch` micro-batches,
- the global order does not depend on the world size: global batch b is always
  `sequence[b*G:(b+1)*G]`, and ranks cut it into contiguous slices in rank order,
- resuming at (epoch, step) seeks straight to `step * G` in the sequence.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ddp.plan import BatchPlan


@dataclass(frozen=True)
class MicroBatch:
    """The sample indices one rank runs forward/backward at once."""

    step: int
    """Iteration (optimizer update) within the epoch this micro-batch belongs to."""
    micro: int
    """Position within the step's accumulation, 0 .. accumulate-1."""
    indices: np.ndarray
    """int64 sample indices into the split, in consumption order."""
    padded: np.ndarray
    """bool per sample: True for repeats that only fill up a batch."""
    epoch: int = 0
    """The epoch it belongs to (image augmentation draws from (seed, epoch, sample))."""

    def __len__(self) -> int:
        return len(self.indices)


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(num_samples), a pure function of (seed, epoch, N).

    Seeding PCG64 with the pair (seed, epoch) through SeedSequence gives
    unrelated streams for neighbouring epochs and seeds, on every platform.
    """
    if num_samples < 0 or seed < 0 or epoch < 0:
        raise ValueError(
            f"epoch_order needs non-negative values, got num_samples={num_samples}, "
            f"seed={seed}, epoch={epoch}"
        )
    rng = np.random.Generator(np.random.PCG64([seed, epoch]))
    return rng.permutation(num_samples).astype(np.int64, copy=False)


def global_sequence(plan: BatchPlan, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's samples in global consumption order, and their padding flags.

    Length is `plan.samples_per_epoch`: the order truncated (drop_last) or padded
    with its own first samples so the last global batch is full.
    """
    order = epoch_order(plan.num_samples, seed, epoch)
    length = plan.samples_per_epoch
    padding = length - len(order)
    if padding <= 0:
        return order[:length], np.zeros(length, dtype=bool)
    # G <= N, so the padding (< G) never needs more than one copy of the order.
    sequence = np.concatenate([order, order[:padding]])
    padded = np.zeros(length, dtype=bool)
    padded[len(order) :] = True
    return sequence, padded


def rank_micro_batches(
    plan: BatchPlan, seed: int, epoch: int, rank: int, start_step: int = 0
) -> Iterator[MicroBatch]:
    """Rank `rank`'s micro-batches for the epoch, from `start_step` to its end.

    Yields exactly (iterations_per_epoch - start_step) * accumulate micro-batches.
    Resuming costs one permutation, whatever the position in the epoch.
    """
    _check_rank(rank, plan.world_size)
    check_start_step(plan, start_step)
    sequence, padded = global_sequence(plan, seed, epoch)
    per_rank = plan.samples_per_rank_per_iteration
    micro = plan.micro_size
    for step in range(start_step, plan.iterations_per_epoch):
        begin = step * plan.global_size + rank * per_rank
        for j in range(plan.accumulate):
            lo = begin + j * micro
            yield MicroBatch(step, j, sequence[lo : lo + micro], padded[lo : lo + micro], epoch)


def eval_micro_batches(
    num_samples: int, micro_size: int, rank: int, world_size: int
) -> list[MicroBatch]:
    """Rank `rank`'s share of a validation pass: every sample once across ranks.

    Ranks take contiguous slices (sequential reads within shards) of
    ceil(N / world_size) samples; every rank gets the same number of full
    micro-batches, the shortfall filled with repeats flagged as padding so that
    metrics can exclude them and no rank waits on a collective the others skip.
    """
    if num_samples < 1 or micro_size < 1:
        raise ValueError(
            f"need num_samples >= 1 and micro_size >= 1, got {num_samples}, {micro_size}"
        )
    _check_rank(rank, world_size)
    per_rank = -(-num_samples // world_size)
    num_micro = -(-per_rank // micro_size)
    lo, hi = min(rank * per_rank, num_samples), min((rank + 1) * per_rank, num_samples)
    total = num_micro * micro_size
    filler = np.arange(total - (hi - lo), dtype=np.int64) % num_samples
    indices = np.concatenate([np.arange(lo, hi, dtype=np.int64), filler])
    padded = np.arange(total) >= hi - lo
    cuts = [slice(k, k + micro_size) for k in range(0, total, micro_size)]
    return [MicroBatch(0, j, indices[cut], padded[cut]) for j, cut in enumerate(cuts)]


def check_start_step(plan: BatchPlan, start_step: int) -> None:
    """A resume point must lie within the epoch (its end included: nothing left)."""
    if not 0 <= start_step <= plan.iterations_per_epoch:
        raise ValueError(
            f"start_step={start_step} is outside the epoch's {plan.iterations_per_epoch} iterations"
        )


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
