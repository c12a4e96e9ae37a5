"""A batch-size sweep against the noise scale's prediction (McCandlish et al. 2018).

Steps S and samples E to reach one validation target trade off as

    (S / S_min - 1) (E / E_min - 1) = 1,   with E = B S,

i.e. S = S_min (1 + B_crit / B): below the critical batch B_crit = E_min / S_min,
doubling the batch nearly halves the steps; above it, the steps barely fall and the
samples grow. S is linear in 1/B (intercept S_min, slope E_min), so a least-squares line
through the sweep's (1/B, S) points gives both, hence B_crit, to set beside the noise
scale B_simple the runs measured (which the paper finds predicts B_crit).

Pure arithmetic on metrics.jsonl records: no torch, no plotting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def steps_to_target(
    epochs: Sequence[dict[str, Any]], monitor: str, target: float, higher_is_better: bool = True
) -> float | None:
    """The global step at which the validation `monitor` first reaches `target`, linearly
    interpolated between the two validations around the crossing (a run validates once per
    epoch: without it, every S would be a whole number of epochs); None if never."""
    sign = 1.0 if higher_is_better else -1.0
    previous = (0.0, None)
    for record in epochs:
        value = record.get(monitor)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        step = float(record["step"])
        if sign * (value - target) >= 0:
            before_step, before = previous
            if before is None or sign * (target - before) <= 0:
                return step
            fraction = (target - before) / (value - before)
            return before_step + fraction * (step - before_step)
        previous = (step, value)
    return None


@dataclass(frozen=True)
class TradeOff:
    """The fitted S = S_min (1 + B_crit / B)."""

    min_steps: float
    """S_min: steps with an infinite batch."""
    min_samples: float
    """E_min: samples with a batch of one."""

    @property
    def critical_batch(self) -> float:
        """B_crit = E_min / S_min."""
        return self.min_samples / self.min_steps

    def steps(self, batch: float) -> float:
        return self.min_steps + self.min_samples / batch


def fit_trade_off(batches: Sequence[float], steps: Sequence[float]) -> TradeOff | None:
    """Least squares of S against 1/B; None with fewer than 3 points or when S_min or E_min
    comes out non-positive (the points do not bend the way the model says: too few
    batch sizes on one side of B_crit, or too noisy)."""
    if len(batches) < 3 or len(batches) != len(steps):
        return None
    xs = [1.0 / b for b in batches]
    mean_x, mean_y = sum(xs) / len(xs), sum(steps) / len(steps)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        return None
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, steps, strict=True)) / spread
    intercept = mean_y - slope * mean_x
    if slope <= 0 or intercept <= 0:
        return None
    return TradeOff(min_steps=intercept, min_samples=slope)
