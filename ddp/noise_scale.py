"""The gradient noise scale: the global batch beyond which more samples per step stop
buying fewer steps (McCandlish, Kaplan, Amodei et al., "An Empirical Model of
Large-Batch Training", 2018).

    B_simple = tr(Σ) / |G|²

G is the true gradient (the mean over the N training samples), Σ the per-sample
gradients' covariance (divisor N). Data parallelism measures both for free, from the
squared norms of gradients at two batch sizes that each step computes anyway: every
rank's own gradient before the all-reduce (a batch of b = micro_size x accumulate
samples; with one process, each micro-batch's) and the averaged one after it (B = the
global batch).

An epoch draws its batches without replacement from the N samples, so a batch of b
samples has (sampling theory's finite population correction)

    E|g_b|² = |G|² + tr(Σ) · c(b),    c(b) = (N - b) / (b (N - 1)).

Two batch sizes give two such equations; solved for the unknowns with S_b, S_B the
epoch's mean squared norms:

    tr(Σ) = (S_b - S_B) / (c(b) - c(B)),    |G|² = S_B - c(B) tr(Σ).

With N -> infinity, c(b) = 1/b and these are the paper's estimators (its appendix A.1):
|G|² = (B S_B - b S_b) / (B - b) and tr(Σ) = (S_b - S_B) / (1/b - 1/B). Without the
correction the estimate of |G|² is low by about tr(Σ)/N (B_simple / N of itself: 7% for
the digits MLP at initialisation), more as B_simple grows during training. Each step's
estimate is noisy, so the two means are taken over the epoch before dividing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def finite_population(batch: float, population: int | None) -> float:
    """c(b): the variance of a mean of `batch` samples drawn without replacement from
    `population`, per unit of per-sample variance (1/b when the population is unknown)."""
    if population is None or population <= 1:
        return 1.0 / batch
    return (population - batch) / (batch * (population - 1))


@dataclass(frozen=True)
class NoiseEstimate:
    grad_sq_norm: float
    """|G|²: the squared norm of the true gradient."""
    grad_var: float
    """tr(Σ): the summed per-sample gradient variance."""

    @property
    def noise_scale(self) -> float:
        """B_simple = tr(Σ) / |G|²; NaN when an estimate came out negative (too noisy to tell)."""
        if not (self.grad_sq_norm > 0 and 0 <= self.grad_var < math.inf):
            return math.nan
        return self.grad_var / self.grad_sq_norm

    def as_metrics(self) -> dict[str, float]:
        return {
            "batch/grad_sq_norm": self.grad_sq_norm,
            "batch/grad_var": self.grad_var,
            "batch/noise_scale": self.noise_scale,
        }


def estimate(
    small_sq: float, big_sq: float, small: float, big: float, population: int | None = None
) -> NoiseEstimate:
    """|G|² and tr(Σ) from the mean squared norms of gradients over batches of `small`
    and `big` samples (small < big <= population), corrected for sampling without
    replacement from `population` samples (None: an infinite one)."""
    if not 0 < small < big:
        raise ValueError(f"need 0 < small batch ({small}) < big batch ({big})")
    c_small, c_big = finite_population(small, population), finite_population(big, population)
    trace = (small_sq - big_sq) / (c_small - c_big)
    return NoiseEstimate(grad_sq_norm=big_sq - c_big * trace, grad_var=trace)
