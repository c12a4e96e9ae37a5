"""The batch plan: how a global batch splits over processes and micro-batches.

Pure arithmetic, no process group, no data: the same function answers
`ddp-plan` before a job is submitted and the trainer at start-up.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ddp.errors import PlanError


@dataclass(frozen=True)
class BatchPlan:
    """How one epoch of `num_samples` is cut into iterations and micro-batches."""

    num_samples: int
    """N: training samples in one epoch."""
    global_size: int
    """G: samples behind one optimizer update (micro_size x accumulate x world_size)."""
    micro_size: int
    """Samples one process runs forward/backward at once."""
    world_size: int
    """Number of processes."""
    drop_last: bool
    """Drop the remainder of N / G (True) or pad the last global batch (False)."""

    @property
    def accumulate(self) -> int:
        """Micro-batches per process per optimizer update."""
        return self.global_size // (self.micro_size * self.world_size)

    @property
    def iterations_per_epoch(self) -> int:
        if self.drop_last:
            return self.num_samples // self.global_size
        return math.ceil(self.num_samples / self.global_size)

    @property
    def micro_batches_per_epoch(self) -> int:
        """Micro-batches every rank runs in one epoch: the same on all ranks."""
        return self.iterations_per_epoch * self.accumulate

    @property
    def samples_per_epoch(self) -> int:
        """Samples consumed in one epoch, padding included."""
        return self.iterations_per_epoch * self.global_size

    @property
    def padded_samples(self) -> int:
        """Repeats of the epoch's first samples that fill the last global batch."""
        return max(0, self.samples_per_epoch - self.num_samples)

    @property
    def dropped_samples(self) -> int:
        """Samples left out of this epoch by drop_last (a different set each epoch)."""
        return max(0, self.num_samples - self.samples_per_epoch)

    @property
    def samples_per_rank_per_iteration(self) -> int:
        return self.micro_size * self.accumulate

    def as_dict(self) -> dict[str, int | bool]:
        derived = {
            "accumulate": self.accumulate,
            "iterations_per_epoch": self.iterations_per_epoch,
            "micro_batches_per_epoch": self.micro_batches_per_epoch,
            "samples_per_epoch": self.samples_per_epoch,
            "padded_samples": self.padded_samples,
            "dropped_samples": self.dropped_samples,
        }
        return {**asdict(self), **derived}

    def table(self) -> str:
        rows = [
            ("samples (N)", f"{self.num_samples:,}"),
            ("world size", f"{self.world_size}"),
            ("micro-batch", f"{self.micro_size}"),
            ("accumulation", f"{self.accumulate}"),
            ("global batch (G)", f"{self.global_size}"),
            ("drop_last", f"{self.drop_last}"),
            ("iterations per epoch", f"{self.iterations_per_epoch:,}"),
            ("micro-batches per rank per epoch", f"{self.micro_batches_per_epoch:,}"),
            ("padded samples per epoch", f"{self.padded_samples:,}"),
            ("dropped samples per epoch", f"{self.dropped_samples:,}"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _nearest_multiples(value: int, unit: int, upper: int) -> list[int]:
    below = (value // unit) * unit
    above = below + unit if below != value else value
    return sorted({m for m in (below, above) if 1 <= m <= upper} or {unit})


def make_plan(
    num_samples: int,
    global_size: int,
    micro_size: int,
    world_size: int,
    drop_last: bool = False,
) -> BatchPlan:
    """Check a batch configuration and return its plan, or raise PlanError naming the key."""
    if num_samples < 1:
        raise PlanError(f"data: the training set is empty (num_samples={num_samples})")
    if world_size < 1:
        raise PlanError(f"world_size={world_size} must be >= 1")
    if micro_size < 1:
        raise PlanError(f"batch.micro_size={micro_size} must be >= 1")
    if global_size < 1:
        raise PlanError(f"batch.global_size={global_size} must be >= 1")
    if global_size > num_samples:
        raise PlanError(
            f"batch.global_size={global_size} exceeds the {num_samples:,} training samples; "
            f"use batch.global_size <= {num_samples}"
        )
    unit = micro_size * world_size
    if global_size % unit:
        nearest = _nearest_multiples(global_size, unit, num_samples)
        if nearest == [unit] and unit > num_samples:
            raise PlanError(
                f"batch.micro_size={micro_size} x world_size={world_size} = {unit} exceeds the "
                f"{num_samples:,} training samples; lower batch.micro_size"
            )
        divisors = [m for m in range(micro_size, 0, -1) if global_size % (m * world_size) == 0]
        hint = f"batch.global_size={' or '.join(map(str, nearest))}"
        if divisors:
            hint += f", or batch.micro_size={divisors[0]}"
        raise PlanError(
            f"batch.global_size={global_size} is not a multiple of batch.micro_size={micro_size} "
            f"x world_size={world_size} = {unit}; nearest valid: {hint}"
        )
    return BatchPlan(num_samples, global_size, micro_size, world_size, drop_last)


def plan_for(batch, world_size: int, num_samples: int) -> BatchPlan:
    """The plan of a `batch` config section (global_size, micro_size, drop_last)."""
    if batch.micro_size == "auto":  # found on the GPU at start-up (ddp.micro_size)
        raise PlanError(
            "batch.micro_size=auto is found on the GPU when the trainer starts; to see a "
            "plan, give a number (e.g. batch.micro_size=32)"
        )
    return make_plan(num_samples, batch.global_size, batch.micro_size, world_size, batch.drop_last)
