"""The batch plan: the arithmetic of the vocabulary (docs/architecture.md), and the refusals
before launch."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ddp.errors import PlanError
from ddp.plan import make_plan


@pytest.mark.parametrize(
    ("n", "g", "micro", "world", "iterations"),
    [(200, 5, 5, 1, 40), (1000, 100, 10, 2, 10), (1000, 100, 25, 4, 10), (1001, 100, 50, 2, 11)],
)
def test_iterations_per_epoch_examples(n, g, micro, world, iterations):
    assert make_plan(n, g, micro, world).iterations_per_epoch == iterations


def test_drop_last_floors_and_padding_fills():
    padded = make_plan(1001, 100, 50, 2, drop_last=False)
    dropped = make_plan(1001, 100, 50, 2, drop_last=True)
    assert (padded.iterations_per_epoch, padded.padded_samples) == (11, 99)
    assert (dropped.iterations_per_epoch, dropped.dropped_samples) == (10, 1)


@given(
    n=st.integers(1, 5000),
    micro=st.integers(1, 64),
    world=st.integers(1, 16),
    accumulate=st.integers(1, 8),
    drop_last=st.booleans(),
)
def test_accumulation_is_derived_from_the_world_size(n, micro, world, accumulate, drop_last):
    g = micro * world * accumulate
    if g > n:
        with pytest.raises(PlanError, match="batch.global_size"):
            make_plan(n, g, micro, world, drop_last)
        return
    plan = make_plan(n, g, micro, world, drop_last)
    assert plan.accumulate == accumulate
    assert plan.micro_size * plan.accumulate * plan.world_size == plan.global_size
    expected = n // g if drop_last else -(-n // g)
    assert plan.iterations_per_epoch == expected
    assert plan.micro_batches_per_epoch == expected * accumulate
    assert plan.padded_samples < g and plan.dropped_samples < g


@pytest.mark.parametrize(
    ("n", "g", "micro", "world", "message"),
    [
        (200, 0, 1, 1, r"batch.global_size=0 must be >= 1"),
        (200, 300, 10, 1, r"batch.global_size=300 exceeds the 200 training samples"),
        (
            200,
            30,
            4,
            2,
            r"not a multiple of batch.micro_size=4 x world_size=2 = 8; nearest valid: "
            r"batch.global_size=24 or 32, or batch.micro_size=3",
        ),
        (200, 10, 0, 1, r"batch.micro_size=0 must be >= 1"),
    ],
)
def test_invalid_batches_name_the_key_and_nearest_values(n, g, micro, world, message):
    with pytest.raises(PlanError, match=message):
        make_plan(n, g, micro, world)
