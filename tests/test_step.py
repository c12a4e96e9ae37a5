"""One step: the update is skipped when the loss is not finite (on the device, with a
fused optimizer), and reading a step's totals a step late (what a GPU does) changes
nothing in the numbers, the position or the checkpoints."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from ddp.data.batch import Batch
from ddp.data.device import InputPipeline, Prefetcher
from ddp.distributed.env import Launch
from ddp.distributed.group import init_distributed
from ddp.models import MLP
from ddp.state import Training
from ddp.step import Stepper, skips_on_device
from tests import harness
from tests.fixtures import smoke_overrides


def training(fused: bool | None, precision_fp16: bool = False) -> Training:
    torch.manual_seed(0)
    model = MLP(16, 4, hidden=(8,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    scaler = torch.amp.GradScaler("cpu", enabled=precision_fp16)
    return Training(model, model, optimizer, scaler, plateau=None)


def batches(nan: bool = False) -> list[Batch]:
    torch.manual_seed(1)
    x, y = torch.randn(2, 4, 16), torch.randint(0, 4, (2, 4))
    if nan:
        x[1, 0, 0] = float("nan")
    return [Batch(x[i], y[i], torch.ones(4, dtype=torch.bool), torch.arange(4)) for i in range(2)]


def one_step(stepper: Stepper, micro: list[Batch], step: int = 0) -> None:
    stepper.begin(step, 0.1, skipped=0, preempt=0, interrupt=0, save=0, failed=0)
    for j, batch in enumerate(micro):
        stepper.forward_backward(batch, len(micro), last=j == len(micro) - 1)
    stepper.finish()


def single_process():
    return init_distributed(Launch("python", 0, 0, 1, 1), torch.device("cpu"))


@pytest.mark.parametrize("fused", [True, None], ids=["on-device", "on-host"])
def test_a_nonfinite_loss_leaves_weights_and_optimizer_untouched(fused):
    t = training(fused)
    stepper = Stepper(t, single_process(), nullcontext, grad_clip=1.0)
    assert stepper.device_skip == bool(fused)
    one_step(stepper, batches())  # a good step first: the optimizer has state
    (good,) = stepper.results()
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    state = {k: v.clone() for k, v in t.optimizer.state_dict()["state"][0].items()}
    one_step(stepper, batches(nan=True), step=1)
    (bad,) = stepper.results()
    assert good.finite and not bad.finite
    for name, value in t.model.state_dict().items():
        assert torch.equal(value, before[name]), name
    for key, value in t.optimizer.state_dict()["state"][0].items():
        assert torch.equal(value, state[key]), key  # step count and moments unchanged
    assert all(p.grad is None for p in t.model.parameters())


def test_totals_read_a_step_late_are_the_same_totals():
    now, late = training(True), training(True)
    at_once = Stepper(now, single_process(), nullcontext, grad_clip=1.0, lag=0)
    lagged = Stepper(late, single_process(), nullcontext, grad_clip=1.0, lag=1)
    read_now, read_late = [], []
    for step in range(4):
        one_step(at_once, batches(nan=step == 2), step)
        one_step(lagged, batches(nan=step == 2), step)
        read_now += at_once.results()
        read_late += lagged.results()
        assert len(read_late) == step  # one step behind
    read_late += lagged.results(drain=True)
    assert [repr(t) for t in read_late] == [repr(t) for t in read_now]  # NaN == NaN as text
    for a, b in zip(now.model.parameters(), late.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_late_read_needs_an_optimizer_that_skips_on_the_device():
    assert not skips_on_device(training(None))
    assert not skips_on_device(training(True, precision_fp16=True))
    with pytest.raises(ValueError, match="fused optimizer"):
        Stepper(training(None), single_process(), nullcontext, grad_clip=None, lag=1)


def test_the_prefetcher_hands_over_what_the_pipeline_makes():
    host = batches()
    pipeline = InputPipeline(torch.device("cpu"), mean=[0.5] * 16, std=[2.0] * 16)
    for fetched, batch in zip(Prefetcher(iter(host), pipeline), host, strict=True):
        assert torch.equal(fetched.inputs, pipeline(batch).inputs)


@pytest.mark.slow
def test_a_run_read_a_step_late_ends_bitwise_equal(digits_root, tmp_path):
    """What a GPU does by default (sync_every_step=null), forced on 2 CPU processes."""
    finals = []
    for sync in ("true", "false"):
        overrides = smoke_overrides(
            digits_root,
            tmp_path,
            f"sync-{sync}",
            f"trainer.sync_every_step={sync}",
            "trainer.checkpoint.every_steps=5",
            "trainer.log_every_steps=1",
        )
        out = harness.train(overrides)
        assert out.returncode == 0, out.stderr[-3000:]
        finals.append(
            torch.load(tmp_path / f"sync-{sync}" / "checkpoints" / "last.pt", weights_only=True)
        )
    assert finals[0]["position"] == finals[1]["position"]
    for name, value in finals[0]["model"].items():
        assert torch.equal(value, finals[1]["model"][name]), name
    steps = [
        [r["train/loss"] for r in harness.records(tmp_path / f"sync-{s}", "train")]
        for s in ("true", "false")
    ]
    assert steps[0] == steps[1]


@pytest.mark.slow
def test_a_nan_on_one_rank_read_late_never_reaches_the_weights(digits_root, nan_root, tmp_path):
    from ddp import checkpoint

    overrides = smoke_overrides(
        nan_root, tmp_path, "nan", "trainer.sync_every_step=false", "trainer.nonfinite=stop"
    )
    out = harness.train(overrides)
    assert out.returncode != 0 and "non-finite loss at epoch 0 step" in out.stdout
    last = tmp_path / "nan" / "checkpoints" / "last.pt"
    if last.exists():
        assert not checkpoint.has_nonfinite(checkpoint.load(last)["model"])


@pytest.mark.slow
def test_checkpoints_of_a_compiled_run_load_without_compilation(digits_root, tmp_path):
    """torch.compile wraps the model; checkpoints keep the plain module's weights. (The
    eager backend exercises the same wrapping as inductor, without its compile time.)"""
    compiled = smoke_overrides(
        digits_root, tmp_path, "run", "trainer.compile.enabled=true",
        "trainer.compile.backend=eager", "trainer.max_steps=5",
    )  # fmt: skip
    out = harness.train(compiled, nproc=0)
    assert out.returncode == 0, out.stderr[-3000:]
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in state["model"])
    plain = harness.train(
        smoke_overrides(digits_root, tmp_path, "run", "trainer.max_steps=8"), nproc=0
    )
    assert plain.returncode == 0 and "(continuing at epoch 0 step 5" in plain.stdout
