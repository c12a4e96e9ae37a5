"""Guarantees of the epoch order (ddp.order): pure functions, no process group."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddp.order import epoch_order, eval_micro_batches, global_sequence, rank_micro_batches
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
