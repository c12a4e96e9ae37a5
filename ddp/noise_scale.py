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


LINEAR_FROM = 0.1
"""Below B_simple the steps to a given loss fall nearly in proportion to the batch; the
advice starts at this fraction of it (beyond B_simple extra samples buy ever less)."""


def useful_global_batches(noise_scale: float, world_size: int, num_samples: int) -> list[int]:
    """Global batches from LINEAR_FROM x B_simple to B_simple (capped at the number of
    samples) that `world_size` processes can run: powers of two times world_size (the
    nearest one when none falls in the range)."""
    low, high = LINEAR_FROM * noise_scale, min(noise_scale, num_samples)
    found, g = [], world_size
    while g <= high:
        if g >= low:
            found.append(g)
        g *= 2
    return found or [max(world_size, min(num_samples, int(2 ** round(math.log2(high)))))]


def advice(
    noise_scale: float,
    epoch: int,
    num_samples: int,
    global_size: int,
    micro_size: int,
    world_size: int,
    drop_last: bool,
) -> str:
    """What `ddp-plan run=RUN_DIR` prints: the measured B_simple, and per global batch in
    its useful range the micro-batch, accumulation and iterations per epoch it implies."""
    lines = [
        f"measured noise scale B_simple = {noise_scale:,.0f} (epoch {epoch}, global batch "
        f"{global_size})",
        "below it, doubling the global batch nearly halves the steps to a given loss; "
        "above it, extra samples per step are largely wasted",
        f"global batches from {LINEAR_FROM:g} x B_simple to B_simple on {world_size} process(es):",
        f"{'global batch':>14} {'micro':>6} {'accumulate':>11} {'iterations/epoch':>17}",
    ]
    for g in useful_global_batches(noise_scale, world_size, num_samples):
        micro = min(micro_size, g // world_size)
        while g % (micro * world_size):
            micro -= 1
        steps = num_samples // g if drop_last else math.ceil(num_samples / g)
        mark = "  <- this run" if g == global_size else ""
        accumulate = g // (micro * world_size)
        lines.append(f"{g:>14} {micro:>6} {accumulate:>11} {steps:>17}{mark}")
    return "\n".join(lines)
