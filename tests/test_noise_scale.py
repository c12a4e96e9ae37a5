"""The noise scale's estimators (ddp.noise_scale) against populations of synthetic
per-sample gradients whose |G|² and tr(Σ) are known exactly."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ddp import checkpoint
from ddp.data.batch import to_model_input
from ddp.data.loaders import build_eval_loader
from ddp.models import MLP
from ddp.noise_scale import advice, estimate, finite_population
from ddp.sweep_fit import fit_trade_off, steps_to_target
from tests import harness
from tests.fixtures import smoke_overrides


def population(rng: np.random.Generator, n: int, dim: int, signal: float) -> np.ndarray:
    """n per-sample gradients in `dim` dimensions: a common direction of size `signal`
    plus anisotropic noise."""
    scales = rng.uniform(0.2, 2.0, size=dim)
    return (
        signal * rng.standard_normal(dim) / math.sqrt(dim) + rng.standard_normal((n, dim)) * scales
    )


def exact(grads: np.ndarray) -> tuple[float, float]:
    """|G|² and tr(Σ) (divisor N) of a population of per-sample gradients."""
    mean = grads.mean(axis=0)
    return float(mean @ mean), float(((grads - mean) ** 2).sum(axis=1).mean())


def mean_sq_norm(rng: np.random.Generator, grads: np.ndarray, batch: int, draws: int) -> np.ndarray:
    """|g_b|² of `draws` batches of `batch` samples, each drawn without replacement."""
    n = len(grads)
    picks = np.stack([rng.choice(n, size=batch, replace=False) for _ in range(draws)])
    means = grads[picks].mean(axis=1)
    return (means**2).sum(axis=1)


sizes = st.integers(min_value=8, max_value=300).flatmap(
    lambda n: st.tuples(
        st.just(n),
        st.integers(min_value=1, max_value=n - 1).flatmap(
            lambda b: st.tuples(st.just(b), st.integers(min_value=b + 1, max_value=n))
        ),
    )
)


@settings(max_examples=60, deadline=None)
@given(sizes=sizes, dim=st.integers(1, 40), signal=st.floats(0.1, 10.0), seed=st.integers(0, 2**31))
def test_the_expected_squared_norms_give_back_the_exact_values(sizes, dim, signal, seed):
    """E|g_b|² = |G|² + tr(Σ) c(b) (sampling without replacement): the estimators, fed the
    expectations at any b < B <= N, return |G|² and tr(Σ) exactly."""
    n, (small, big) = sizes
    grads = population(np.random.default_rng(seed), n, dim, signal)
    g2, trace = exact(grads)
    expected = [g2 + trace * finite_population(b, n) for b in (small, big)]
    found = estimate(*expected, small, big, population=n)
    assert found.grad_sq_norm == pytest.approx(g2, rel=1e-6, abs=1e-9 * trace)
    assert found.grad_var == pytest.approx(trace, rel=1e-6)


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(64, 400),
    fractions=st.tuples(st.floats(0.02, 0.3), st.floats(0.35, 1.0)),
    signal=st.floats(1.0, 6.0),
    seed=st.integers(0, 2**31),
)
def test_the_estimates_from_drawn_batches_are_unbiased(n, fractions, signal, seed):
    """Means over many drawn batches: both estimates within 5 standard errors of the
    truth (a biased estimator, e.g. one without the finite population correction,
    fails this at large B/N)."""
    rng = np.random.default_rng(seed)
    small, big = max(1, int(fractions[0] * n)), max(2, int(fractions[1] * n))
    if big <= small:
        big = small + 1
    grads = population(rng, n, 16, signal)
    g2, trace = exact(grads)
    draws = 3000
    s_small, s_big = mean_sq_norm(rng, grads, small, draws), mean_sq_norm(rng, grads, big, draws)
    found = estimate(s_small.mean(), s_big.mean(), small, big, population=n)
    # Standard errors of the two linear estimators from the draws' spread.
    c_small, c_big = finite_population(small, n), finite_population(big, n)
    se_small, se_big = s_small.std() / math.sqrt(draws), s_big.std() / math.sqrt(draws)
    se_trace = math.hypot(se_small, se_big) / (c_small - c_big)
    se_g2 = math.hypot(se_big, c_big * se_trace) + c_big * se_trace
    assert abs(found.grad_var - trace) <= 5 * se_trace + 1e-9
    assert abs(found.grad_sq_norm - g2) <= 5 * se_g2 + 1e-9


def test_without_the_correction_the_true_gradient_is_underestimated():
    """At B close to N the plain (infinite population) estimator is far off; the
    corrected one is not."""
    rng = np.random.default_rng(0)
    grads = population(rng, 200, 16, 2.0)
    g2, trace = exact(grads)
    small, big = 10, 180
    expected = [g2 + trace * finite_population(b, 200) for b in (small, big)]
    plain = estimate(*expected, small, big)
    corrected = estimate(*expected, small, big, population=200)
    assert corrected.noise_scale == pytest.approx(trace / g2, rel=1e-6)
    assert abs(plain.noise_scale - trace / g2) > 0.05 * trace / g2


def test_a_noise_scale_that_cannot_be_told_is_nan():
    assert math.isnan(estimate(1.0, 1.2, 4, 8).noise_scale)  # the big batch noisier: tr < 0
    assert math.isnan(estimate(3.0, 1.0, 4, 8).noise_scale)  # |G|² < 0
    with pytest.raises(ValueError, match="small batch"):
        estimate(1.0, 1.0, 8, 8)


# ---------------------------------------------------------------- the trainer's estimate


def exact_noise_scale(model: torch.nn.Module, split: Path) -> tuple[float, float]:
    """|G|² and tr(Σ) of `model`'s per-example gradients over the whole split, from
    torch.func (vmap of grad): the values the trainer estimates."""
    loader = build_eval_loader(split, micro_size=4096, rank=0, world_size=1)
    (batch,) = list(loader)
    inputs, targets = to_model_input(batch.inputs), batch.targets
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = torch.func.functional_call(model, p, (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(
        params, inputs, targets
    )
    flat = torch.cat([g.reshape(len(targets), -1) for g in per_sample.values()], dim=1).double()
    mean = flat.mean(dim=0)
    return float(mean @ mean), float(((flat - mean) ** 2).sum(dim=1).mean())


FROZEN = ("optim.lr=1e-12", "model.dropout=0.0", "plateau=none", "trainer.max_epochs=12")
"""A run whose weights do not move: every epoch measures the same gradients."""


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [0, 2], ids=["one-process-accumulating", "two-processes"])
def test_the_trainers_noise_scale_matches_per_example_gradients(digits_root, tmp_path, nproc):
    """The trainer's per-epoch estimates (means over the epochs of a run that does not
    move its weights) against the exact values at those weights: B_simple within 15%."""
    out = harness.train(smoke_overrides(digits_root, tmp_path, "frozen", *FROZEN), nproc=nproc)
    assert out.returncode == 0, out.stderr[-3000:]
    epochs = harness.records(tmp_path / "frozen", "val")
    assert len(epochs) == 12 and all("batch/noise_scale" in e for e in epochs)
    assert "noise scale " in out.stdout and "(global batch 64)" in out.stdout
    g2 = float(np.mean([e["batch/grad_sq_norm"] for e in epochs]))
    trace = float(np.mean([e["batch/grad_var"] for e in epochs]))
    model = MLP(in_features=64, num_classes=10, hidden=[128, 64])
    state = checkpoint.load(tmp_path / "frozen" / "checkpoints" / "last.pt")
    model.load_state_dict(state["model"])
    exact_g2, exact_trace = exact_noise_scale(model, digits_root / "train")
    assert trace / g2 == pytest.approx(exact_trace / exact_g2, rel=0.15)
    assert trace == pytest.approx(exact_trace, rel=0.15)


@pytest.mark.slow
def test_one_process_without_accumulation_says_it_does_not_measure(digits_root, tmp_path):
    extra = ("batch.micro_size=64", "trainer.max_epochs=1")
    out = harness.train(smoke_overrides(digits_root, tmp_path, "one", *extra), nproc=0)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("noise scale: not measured (one process without accumulation") == 1
    assert "batch/noise_scale" not in harness.records(tmp_path / "one", "val")[0]


# ---------------------------------------------------------------- which global batch


def test_the_advice_spans_a_tenth_of_the_noise_scale_to_the_noise_scale():
    text = advice(188.0, 3, 1438, 64, 32, 8, drop_last=False)
    rows = [line.split() for line in text.splitlines()[4:]]
    assert [int(r[0]) for r in rows] == [32, 64, 128]  # 18.8 .. 188, multiples of 8
    assert [int(r[3]) for r in rows] == [45, 23, 12]  # ceil(1438 / G)
    assert [(int(r[1]), int(r[2])) for r in rows] == [(4, 1), (8, 1), (16, 1)]
    assert rows[1][-3:] == ["<-", "this", "run"]
    assert "B_simple = 188 (epoch 3, global batch 64)" in text


@pytest.mark.slow
def test_ddp_plan_advises_from_a_runs_noise_scale(digits_root, tmp_path):
    out = harness.train(
        smoke_overrides(digits_root, tmp_path, "r", "trainer.max_epochs=1"), nproc=0
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (epoch,) = harness.records(tmp_path / "r", "val")
    plan = harness.run(
        [sys.executable, "-m", "ddp.plan_cli", f"run={tmp_path / 'r'}", "world_size=4"]
    )
    assert plan.returncode == 0, plan.stderr
    assert f"B_simple = {epoch['batch/noise_scale']:,.0f} (epoch 0, global batch 64)" in plan.stdout
    assert "on 4 process(es)" in plan.stdout and "<- this run" in plan.stdout
    missing = harness.run([sys.executable, "-m", "ddp.plan_cli", f"run={tmp_path}"])
    assert missing.returncode == 2 and missing.stderr.startswith("error: run=")


# ---------------------------------------------------------------- the sweep's trade-off


@settings(max_examples=50, deadline=None)
@given(
    min_steps=st.floats(1.0, 1e4),
    critical=st.floats(1.0, 1e5),
    batches=st.lists(st.integers(1, 1 << 16), min_size=3, max_size=8, unique=True),
)
def test_the_fit_recovers_the_critical_batch_of_an_exact_trade_off(min_steps, critical, batches):
    """Points on S = S_min (1 + B_crit / B) give back S_min, E_min and B_crit."""
    steps = [min_steps * (1 + critical / b) for b in batches]
    fit = fit_trade_off(batches, steps)
    assert fit is not None
    assert fit.min_steps == pytest.approx(min_steps, rel=1e-6)
    assert fit.critical_batch == pytest.approx(critical, rel=1e-6)
    assert all(
        fit.steps(b) == pytest.approx(s, rel=1e-9) for b, s in zip(batches, steps, strict=True)
    )


def test_no_fit_where_the_steps_do_not_fall_with_the_batch():
    assert fit_trade_off([16, 32], [100.0, 50.0]) is None  # two points
    assert fit_trade_off([16, 32, 64], [10.0, 20.0, 40.0]) is None  # E_min < 0
    assert fit_trade_off([16, 32, 64], [100.0, 50.0, 25.0]) is None  # S_min = 0: all linear


def test_steps_to_target_interpolates_between_validations():
    epochs = [{"step": 10, "acc": 0.5}, {"step": 20, "acc": 0.7}, {"step": 30, "acc": 0.9}]
    assert steps_to_target(epochs, "acc", 0.6) == pytest.approx(15.0)
    assert steps_to_target(epochs, "acc", 0.4) == 10.0  # already at the first validation
    assert steps_to_target(epochs, "acc", 0.95) is None
    losses = [{"step": 10, "loss": 2.0}, {"step": 20, "loss": 1.0}]
    assert steps_to_target(losses, "loss", 1.5, higher_is_better=False) == pytest.approx(15.0)
