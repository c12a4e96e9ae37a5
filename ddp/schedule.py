"""Learning rate as a pure function of the global step.

Stepped once per iteration (optimizer update). The plateau tracker's reductions
multiply on top, so a resumed run needs only (global step, plateau state) to
land on the same learning rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def scaled_lr(lr: float, global_size: int, base_global_size: int, rule: str) -> float:
    """The peak learning rate for this global batch (linear or sqrt scaling rule)."""
    ratio = global_size / base_global_size
    return {"none": lr, "linear": lr * ratio, "sqrt": lr * math.sqrt(ratio)}[rule]


@dataclass(frozen=True)
class LRSchedule:
    peak_lr: float
    name: str
    """warmup_cosine | constant | plateau"""
    warmup_iterations: int = 0
    total_iterations: int | None = None
    """Cosine length; None when the run has no max_epochs (then the cosine is flat)."""
    min_lr_ratio: float = 0.0

    def lr_at(self, step: int, plateau_scale: float = 1.0) -> float:
        """Learning rate for the update that follows `step` completed updates."""
        lr = self.peak_lr * plateau_scale
        if step < self.warmup_iterations:
            return lr * (step + 1) / self.warmup_iterations
        if self.name != "warmup_cosine" or not self.total_iterations:
            return lr
        span = max(1, self.total_iterations - self.warmup_iterations)
        progress = min(1.0, (step - self.warmup_iterations) / span)
        floor = self.min_lr_ratio
        return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
