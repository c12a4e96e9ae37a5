"""Guarantees of the epoch order (ddp.order): pure functions, no process group."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddp.order import (
    ShardWindows,
    WindowedPermutation,
    epoch_order,
    epoch_permutation,
    eval_micro_batches,
    global_sequence,
    rank_micro_batches,
)
from ddp.plan import BatchPlan, make_plan

FAST = settings(max_examples=60, deadline=None)


@st.composite
def plans(draw: st.DrawFn) -> BatchPlan:
    world = draw(st.integers(1, 4))
    micro = draw(st.integers(1, 6))
    accumulate = draw(st.integers(1, 4))
    global_size = micro * accumulate * world
    num = draw(st.integers(global_size, global_size * 7 + 5))
    return make_plan(num, global_size, micro, world, draw(st.booleans()))


def all_ranks(plan: BatchPlan, seed: int = 0, epoch: int = 0) -> list[list]:
    return [list(rank_micro_batches(plan, seed, epoch, r)) for r in range(plan.world_size)]


def consumed(plan: BatchPlan, seed: int = 0, epoch: int = 0) -> tuple[Counter, Counter]:
    real, padding = Counter(), Counter()
    for micros in all_ranks(plan, seed, epoch):
        for m in micros:
            real.update(m.indices[~m.padded].tolist())
            padding.update(m.indices[m.padded].tolist())
    return real, padding


@FAST
@given(plans(), st.integers(0, 3))
def test_every_sample_once_per_epoch(plan: BatchPlan, epoch: int) -> None:
    real, padding = consumed(plan, seed=7, epoch=epoch)
    assert all(count == 1 for count in real.values())
    if plan.drop_last:
        assert len(real) == plan.samples_per_epoch and not padding
    else:
        assert set(real) == set(range(plan.num_samples))
        assert sum(padding.values()) == plan.padded_samples <= plan.global_size - 1


@FAST
@given(plans())
def test_ranks_are_disjoint_apart_from_padding(plan: BatchPlan) -> None:
    per_rank = [
        {i for m in micros for i in m.indices[~m.padded].tolist()} for micros in all_ranks(plan)
    ]
    assert sum(len(s) for s in per_rank) == len(set().union(*per_rank))


@FAST
@given(plans(), st.integers(0, 5))
def test_every_rank_gets_iterations_times_accumulate_micro_batches(
    plan: BatchPlan, epoch: int
) -> None:
    for micros in all_ranks(plan, epoch=epoch):
        assert len(micros) == plan.iterations_per_epoch * plan.accumulate
        assert all(len(m) == plan.micro_size for m in micros)
        assert [(m.step, m.micro) for m in micros] == [
            (s, j) for s in range(plan.iterations_per_epoch) for j in range(plan.accumulate)
        ]


def test_order_changes_between_epochs_and_repeats_for_same_seed() -> None:
    orders = [epoch_order(1000, seed=3, epoch=e) for e in range(4)]
    for a in orders:
        assert np.array_equal(np.sort(a), np.arange(1000)) and a.dtype == np.int64
    assert all(not np.array_equal(a, b) for i, a in enumerate(orders) for b in orders[i + 1 :])
    assert np.array_equal(orders[2], epoch_order(1000, seed=3, epoch=2))
    assert not np.array_equal(orders[0], epoch_order(1000, seed=4, epoch=0))


def global_order(plan: BatchPlan, seed: int, epoch: int) -> list[int]:
    """Concatenate each step's micro-batches in rank order: the global order."""
    ranks = all_ranks(plan, seed, epoch)
    out = []
    for step in range(plan.iterations_per_epoch):
        for micros in ranks:
            for m in micros[step * plan.accumulate : (step + 1) * plan.accumulate]:
                out.extend(m.indices.tolist())
    return out


@pytest.mark.parametrize("drop_last", [False, True])
def test_global_order_independent_of_world_size(drop_last: bool) -> None:
    orders = [
        global_order(make_plan(203, 48, 4, world, drop_last), seed=1, epoch=2)
        for world in (1, 2, 4)
    ]
    assert orders[0] == orders[1] == orders[2]
    assert orders[0] == global_sequence(make_plan(203, 48, 4, 1, drop_last), 1, 2)[0].tolist()


@FAST
@given(plans(), st.data())
def test_resume_gives_exactly_the_rest_of_the_epoch(plan: BatchPlan, data: st.DataObject) -> None:
    step = data.draw(st.integers(0, plan.iterations_per_epoch))
    rank = data.draw(st.integers(0, plan.world_size - 1))
    full = list(rank_micro_batches(plan, 5, 1, rank))
    rest = list(rank_micro_batches(plan, 5, 1, rank, start_step=step))
    assert len(rest) == (plan.iterations_per_epoch - step) * plan.accumulate
    tail = full[step * plan.accumulate :]
    assert all(
        np.array_equal(a.indices, b.indices) and np.array_equal(a.padded, b.padded)
        for a, b in zip(rest, tail, strict=True)
    )


# ------------------------------------------------------------ the shard-window order


@st.composite
def windowed(draw: st.DrawFn) -> tuple[BatchPlan, ShardWindows]:
    """A plan over shards of 0-9 samples each (a split's odd last shard, empty ones), cut
    into windows of 1-5 shards."""
    world, micro, accumulate = draw(st.integers(1, 3)), draw(st.integers(1, 4)), 1
    global_size = world * micro * accumulate
    counts = draw(st.lists(st.integers(0, 9), min_size=1, max_size=12))
    counts[0] = max(counts[0], global_size - sum(counts[1:]))  # at least one global batch
    plan = make_plan(sum(counts), global_size, micro, world, draw(st.booleans()))
    return plan, ShardWindows(tuple(counts), draw(st.integers(1, 5)))


@FAST
@given(windowed(), st.integers(0, 3), st.data())
def test_shard_windows_keep_every_guarantee(case, epoch: int, data: st.DataObject) -> None:
    """Every sample once per epoch, equal micro-batch counts, the same global sequence at
    any world size, and a resume that gives exactly the rest of the epoch."""
    plan, windows = case
    ranks = [
        list(rank_micro_batches(plan, 7, epoch, r, 0, windows)) for r in range(plan.world_size)
    ]
    real = Counter(i for micros in ranks for m in micros for i in m.indices[~m.padded].tolist())
    assert all(count == 1 for count in real.values())
    assert len(real) == (plan.samples_per_epoch if plan.drop_last else plan.num_samples)
    assert {len(micros) for micros in ranks} == {plan.micro_batches_per_epoch}

    sequence = global_sequence(plan, 7, epoch, windows)[0]
    steps = [[m.indices for micros in ranks for m in micros if m.step == s] for s in range(
        plan.iterations_per_epoch)]  # fmt: skip
    assert np.array_equal(np.concatenate([np.concatenate(s) for s in steps]), sequence)

    rank = data.draw(st.integers(0, plan.world_size - 1))
    step = data.draw(st.integers(0, plan.iterations_per_epoch))
    rest = list(rank_micro_batches(plan, 7, epoch, rank, step, windows))
    tail = ranks[rank][step * plan.accumulate :]
    assert [m.indices.tolist() for m in rest] == [m.indices.tolist() for m in tail]


@FAST
@given(windowed(), st.integers(0, 3))
def test_a_window_reads_only_its_shards(case, epoch: int) -> None:
    """The epoch walks through the windows in turn: the samples at a window's positions
    are exactly those of its `shards` shards."""
    plan, windows = case
    perm = WindowedPermutation(windows, 3, epoch)
    starts = np.concatenate([[0], np.cumsum(windows.counts)])
    order = perm(np.arange(plan.num_samples))
    for w in range(len(perm.window_starts) - 1):
        lo, hi = perm.window_starts[w], perm.window_starts[w + 1]
        shards = perm.shard_order[w * windows.shards : (w + 1) * windows.shards]
        expected = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in shards])
        assert np.array_equal(np.sort(order[lo:hi]), np.sort(expected))


def test_shard_windows_shuffle_within_a_window_and_change_every_epoch() -> None:
    """100 shards of SHARD samples, windows of 4: consecutive samples share a shard as
    often as in a true shuffle of 4 shards ((SHARD−1)/(4·SHARD−1) ≈ 0.25, 5σ bounds), the
    shards come in another order each epoch, and no window is read front to back."""
    windows = ShardWindows((SHARD,) * (N_STAT // SHARD), 4)
    expected = (SHARD - 1) / (4 * SHARD - 1)
    bound = 5 * np.sqrt(expected * (1 - expected) / N_STAT)
    orders = [WindowedPermutation(windows, 0, epoch) for epoch in range(3)]
    for perm in orders:
        order = perm(np.arange(N_STAT))
        assert abs(same_shard_fraction(order) - expected) < bound
        first = order[: 4 * SHARD]
        assert abs(spearman(np.arange(len(first)), first)) < 5 / np.sqrt(len(first))
    firsts = [tuple(p.shard_order[:4].tolist()) for p in orders]
    assert len(set(firsts)) == 3


def test_shard_windows_of_the_wrong_size_are_an_error() -> None:
    with pytest.raises(ValueError, match="data.window_shards=0"):
        ShardWindows((5, 5), 0)
    with pytest.raises(ValueError, match="the shard windows hold 10 samples, the plan 11"):
        list(rank_micro_batches(make_plan(11, 2, 2, 1), 0, 0, 0, 0, ShardWindows((5, 5), 1)))


def test_resume_outside_the_epoch_is_an_error() -> None:
    plan = make_plan(100, 10, 5, 2)
    with pytest.raises(ValueError, match="start_step=11"):
        list(rank_micro_batches(plan, 0, 0, 0, start_step=11))
    with pytest.raises(ValueError, match="rank=2"):
        list(rank_micro_batches(plan, 0, 0, 2))


@FAST
@given(st.integers(1, 200), st.integers(1, 9), st.integers(1, 5))
def test_eval_uses_every_sample_once_with_equal_batch_counts(
    num: int, micro: int, world: int
) -> None:
    shares = [eval_micro_batches(num, micro, r, world) for r in range(world)]
    assert len({len(s) for s in shares}) == 1
    real = [i for s in shares for m in s for i in m.indices[~m.padded].tolist()]
    assert sorted(real) == list(range(num))
    assert all(len(m) == micro for s in shares for m in s)
    padding = sum(int(m.padded.sum()) for s in shares for m in s)
    assert padding < world * micro + world


# ---------------------------------------------------------------- the permutation itself


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 5000), st.integers(0, 2**32), st.integers(0, 1000))
def test_the_order_is_a_permutation_for_any_n(num: int, seed: int, epoch: int) -> None:
    order = epoch_order(num, seed, epoch)
    assert order.dtype == np.int64 and np.array_equal(np.sort(order), np.arange(num))


@pytest.mark.parametrize("num", [1, 2, 3, 4, 99, 100, 101, 2**20 - 1, 2**20, 2**20 + 1])
def test_the_order_is_a_permutation_at_squares_and_powers_of_two(num: int) -> None:
    """a·b − N is largest just above a square: cycle walking is busiest there."""
    assert np.array_equal(np.sort(epoch_order(num, 11, 3)), np.arange(num))


def test_any_position_is_computed_alone() -> None:
    """π(p) at a handful of positions equals the materialised order there."""
    order = epoch_order(100_003, 2, 9)
    perm = epoch_permutation(100_003, 2, 9)
    positions = np.random.default_rng(0).integers(0, 100_003, 500)
    assert np.array_equal(perm(positions), order[positions])
    assert np.array_equal(perm(positions[:1]), order[positions[:1]])


def test_positions_of_a_huge_epoch_are_distinct_and_in_range() -> None:
    """At N = 10^12 nothing per sample exists: 200,000 positions (a run at the end and
    random ones) map to distinct samples in [0, N)."""
    num = 10**12
    perm = epoch_permutation(num, 0, 4)
    positions = np.concatenate(
        [np.arange(num - 100_000, num), np.random.default_rng(1).choice(num - 100_000, 100_000)]
    )
    samples = perm(np.unique(positions))
    assert samples.min() >= 0 and samples.max() < num
    assert len(np.unique(samples)) == len(samples)


def test_positions_outside_the_epoch_are_an_error() -> None:
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        epoch_permutation(10, 0, 0)(np.array([10]))
    with pytest.raises(ValueError, match="non-negative"):
        epoch_permutation(10, -1, 0)


# ---------------------------------------------------------------- against a true shuffle
#
# Each statistic is computed for our order and for numpy's shuffle (PCG64), and both must
# fall within the bound a true shuffle meets: five standard deviations of the statistic's
# distribution under a uniformly random permutation (deterministic seeds: no flakes). A
# weak order (shards shuffled, samples within a shard in order) fails each bound, so the
# bounds do discriminate.

N_STAT = 100_000
SHARD = 1_000
"""N_STAT samples in 100 shards of SHARD consecutive indices."""


def true_shuffle(num: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(num)


def shard_shuffle(num: int, seed: int) -> np.ndarray:
    """The weak order: a shuffle of whole shards, each read front to back."""
    shards = np.random.default_rng(seed).permutation(num // SHARD)
    return (shards[:, None] * SHARD + np.arange(SHARD)).ravel()


def orders_under_test(seed: int) -> dict[str, np.ndarray]:
    return {"ours": epoch_order(N_STAT, seed, 1), "true shuffle": true_shuffle(N_STAT, seed)}


def same_shard_fraction(order: np.ndarray) -> float:
    shard = order // SHARD
    return float(np.mean(shard[1:] == shard[:-1]))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Rank correlation; x and y here are permutations (or positions), their own ranks."""
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_consecutive_samples_share_a_shard_as_often_as_in_a_true_shuffle(seed: int) -> None:
    """True shuffle: P(same shard) = (SHARD−1)/(N−1) ≈ 0.00999, σ ≈ 0.00032."""
    expected = (SHARD - 1) / (N_STAT - 1)
    bound = 5 * np.sqrt(expected * (1 - expected) / N_STAT)
    for name, order in orders_under_test(seed).items():
        assert abs(same_shard_fraction(order) - expected) < bound, name
    assert abs(same_shard_fraction(shard_shuffle(N_STAT, seed)) - expected) > bound


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_position_and_sample_are_uncorrelated(seed: int) -> None:
    """Spearman's ρ between position and sample index: 0 ± 1/√N under a true shuffle."""
    bound = 5 / np.sqrt(N_STAT)
    positions = np.arange(N_STAT)
    for name, order in orders_under_test(seed).items():
        assert abs(spearman(positions, order)) < bound, name
        first = order[: N_STAT // 10]  # also within the epoch's first tenth
        assert abs(spearman(np.arange(len(first)), first)) < 5 / np.sqrt(len(first)), name


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_neighbours_land_far_apart(seed: int) -> None:
    """E|π(p+1) − π(p)| = N/3 under a true shuffle (σ of the mean ≈ N·0.236/√N), and the
    same for where two neighbouring samples of a shard land (the inverse)."""
    bound = 5 * np.sqrt(1 / 18) / np.sqrt(N_STAT)
    for name, order in orders_under_test(seed).items():
        where = np.argsort(order)
        for seq in (order, where):
            gap = np.mean(np.abs(np.diff(seq))) / N_STAT
            assert abs(gap - 1 / 3) < bound, name
    gap = np.mean(np.abs(np.diff(shard_shuffle(N_STAT, seed)))) / N_STAT
    assert abs(gap - 1 / 3) > bound


@pytest.mark.parametrize("seed", [0, 5])
def test_successive_epochs_are_unrelated(seed: int) -> None:
    """Epochs e and e+1 (and seeds s, s+1): where a sample lands in one says nothing of
    where it lands in the other (ρ = 0 ± 1/√N); positions holding the same sample in both
    are Poisson(1) under a true shuffle: at most 8 (P(X > 8) < 10⁻⁵)."""
    bound = 5 / np.sqrt(N_STAT)
    pairs = [(epoch_order(N_STAT, seed, e), epoch_order(N_STAT, seed, e + 1)) for e in range(3)]
    pairs.append((epoch_order(N_STAT, seed, 2), epoch_order(N_STAT, seed + 1, 2)))
    pairs.append((true_shuffle(N_STAT, seed), true_shuffle(N_STAT, seed + 1)))
    for a, b in pairs:
        assert abs(spearman(np.argsort(a), np.argsort(b))) < bound
        assert abs(spearman(a, b)) < bound
        assert np.sum(a == b) <= 8


@pytest.mark.parametrize("num", [7, 16, 1000])
def test_every_sample_lands_anywhere_with_equal_chance(num: int) -> None:
    """Over 4,000 epochs, the position of samples 0, 1 and N−1, in (at most) 10 bins, is
    uniform: Pearson's χ² below the 10⁻⁴ quantile of its distribution (for 6 and 9
    degrees of freedom: 27.9 and 33.7). Small N is where streaming shuffles its shards."""
    epochs = 4000
    bins = min(num, 10)
    critical = {6: 27.86, 9: 33.72}[bins - 1]
    where = np.stack([np.argsort(epoch_order(num, 3, e)) for e in range(epochs)])
    for sample in (0, 1, num - 1):
        counts = np.bincount(where[:, sample] * bins // num, minlength=bins)
        expected = epochs * np.diff(np.ceil(np.arange(bins + 1) * num / bins))
        expected = expected / num
        chi2 = float(np.sum((counts - expected) ** 2 / expected))
        assert chi2 < critical, (sample, chi2)


def test_a_tiny_epoch_draws_every_order_with_equal_chance() -> None:
    """N = 5 (streaming shuffles a few shards): over 3,000 epochs each of the 120 orders
    comes up 25 times on average; Pearson's χ² (119 degrees of freedom) stays below its
    10⁻⁴ quantile, 185.1. (Six rounds instead of 24: χ² = 334.)"""
    epochs = 3000
    for draw in (lambda e: epoch_order(5, 0, e), lambda e: true_shuffle(5, e)):
        counts = Counter(tuple(draw(e).tolist()) for e in range(epochs))
        observed = np.array([counts[p] for p in itertools.permutations(range(5))])
        assert np.sum((observed - epochs / 120) ** 2 / (epochs / 120)) < 185.1
