"""The main job end to end: 2 processes under torchrun, gloo, digits shards; the
refusals of bad configs and batches, checked in-process and once through each command."""

import json
import math
import re
from contextlib import nullcontext
from dataclasses import asdict

import pytest
import torch
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from ddp import checkpoint, plan_cli
from ddp.build import wrap_ddp
from ddp.compose import compose
from ddp.data.batch import Batch
from ddp.data.splits import train_samples
from ddp.distributed.exit import retire
from ddp.distributed.group import DistEnv
from ddp.errors import ConfigError, PlanError
from ddp.models import MLP
from ddp.plan import plan_for
from ddp.state import Training
from ddp.step import Stepper
from tests import harness
from tests.distributed import run_distributed_test
from tests.fixtures import smoke_overrides
from tests.harness import BIN, records


def summary(run_dir):
    return records(run_dir, "summary")[-1]


@pytest.mark.slow
def test_default_experiment_trains_digits_to_97_percent(digits_root, tmp_path):
    out = harness.train(
        ["experiment=digits", f"data.root={digits_root}", f"run.root={tmp_path}", "run.name=main"]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "iterations per epoch              23" in out.stdout  # the plan, printed at start
    run_dir = tmp_path / "main"
    result = summary(run_dir)
    assert result["best_value"] >= 0.97
    assert result["stop_reason"] in ("plateau", "max_epochs")
    assert (run_dir / "learning_curves.png").stat().st_size > 0
    for name in ("last.pt", "best.pt"):
        state = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        assert state["plan"]["global_size"] == 64

    # The offline W&B run, read back by W&B's own reader.
    text = json.dumps(json.loads(harness.wandb_inspect(run_dir / "wandb", "--summary")))
    for key in ("best_value", "best_epoch", "stop_reason", "val/accuracy", "train/loss"):
        assert key in text, key


@pytest.mark.slow
@pytest.mark.parametrize("memory_mb", [256, 0], ids=["memory", "shards"])
def test_ranks_run_the_same_steps_and_every_sample_once(tmp_path, smoke, memory_mb):
    out = harness.train(
        [
            *smoke,
            f"data.loader.in_memory_max_mb={memory_mb}",
            "trainer.audit_samples=true",
            "batch.global_size=100",
            "batch.micro_size=25",
        ]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "runs" / "test"
    plan = records(run_dir, "plan")[0]
    assert plan["accumulate"] == 2 and plan["iterations_per_epoch"] == 15  # 1,438 / 100
    assert summary(run_dir)["micro_batches_per_rank"] == [2 * 15 * 2] * 2
    for epoch in records(run_dir, "val"):
        assert epoch["audit/unique_samples"] == plan["num_samples"]
        assert epoch["audit/missing_samples"] == 0
        assert epoch["audit/repeated_samples"] == plan["padded_samples"] == 62


def accumulate_twice(env: DistEnv, micro: int, accumulate: int) -> dict:
    """One update with no_sync accumulation, then a step with a NaN sample on rank 1; the
    step sums that ride on the gradient all-reduce, as this rank saw them after each."""
    torch.manual_seed(0)  # the same initial weights and data on every rank
    model = MLP(64, 10, hidden=(32,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    training = Training(model, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), None)
    wrap_ddp(training, env)
    inputs = torch.randn(env.world_size * accumulate * micro, 64)
    targets = torch.randint(0, 10, (len(inputs),))
    share = len(inputs) // env.world_size
    mine = slice(env.rank * share, (env.rank + 1) * share)
    batches = [
        Batch(x, y, torch.ones(len(y), dtype=torch.bool), torch.arange(len(y)))
        for x, y in zip(inputs[mine].split(micro), targets[mine].split(micro), strict=True)
    ]
    stepper = Stepper(training, env, nullcontext, grad_clip=None)

    def step(preempt: bool) -> dict:
        stepper.begin(0, 0.5, skipped=0, preempt=preempt, interrupt=0, save=0, failed=0)
        for j, batch in enumerate(batches):
            stepper.forward_backward(batch, accumulate, last=j == accumulate - 1)
        carried = stepper.sums._reduced is not None  # no collective of its own
        stepper.finish()
        (totals,) = stepper.results()
        return {"carried": carried, **asdict(totals)}

    seen = [step(preempt=env.rank == 1)]  # raised by rank 1 alone
    params = {k: v.clone() for k, v in model.state_dict().items()}
    if env.rank == 1:  # a NaN sample on one rank: every rank must see a non-finite loss
        batches[0].inputs[0, 0] = float("nan")
    seen.append(step(preempt=False))
    after_nan = {k: v.clone() for k, v in model.state_dict().items()}
    retire(training.ddp_model)
    return {"params": params, "after_nan": after_nan, "inputs": inputs, "targets": targets,
            "sums": seen}  # fmt: skip


def test_no_sync_accumulation_equals_one_big_batch():
    ranks = run_distributed_test(accumulate_twice, world_size=2, func_args=(4, 3))
    saved = ranks[0]

    torch.manual_seed(0)
    model = MLP(64, 10, hidden=(32,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    logits = model(saved["inputs"])
    torch.nn.functional.cross_entropy(logits, saved["targets"]).backward()
    optimizer.step()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(saved["params"][name], value, rtol=1e-5, atol=1e-6)

    # The step sums rode on the gradient all-reduce: the same totals on both ranks.
    seen = [ranks[r]["sums"] for r in (0, 1)]
    assert json.dumps(seen[0]) == json.dumps(seen[1])  # as text, where NaN equals NaN
    first, second = seen[0]
    assert first["carried"] and second["carried"]
    assert first["count"] == 2 * 4 * 3 and first["preempt"] == 1.0  # raised by rank 1 only
    loss = torch.nn.functional.cross_entropy(logits.detach(), saved["targets"], reduction="sum")
    assert first["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert second["preempt"] == 0.0 and math.isnan(second["loss"])  # rank 1's NaN, seen by all
    for rank in ranks:  # and no rank applied that step's update
        for name, value in rank["after_nan"].items():
            assert torch.equal(value, saved["params"][name]), name


# ---- refusals before launch: in-process, then once through each command


def trainer_checks(*overrides: str) -> None:
    """What the trainer checks before any process group: the composed config, then the
    batch plan for one process over the training set's manifest."""
    config = compose(list(overrides))
    plan_for(config.batch, 1, train_samples(config.data))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("batch.global_size=30", "batch.global_size=30 is not a multiple of batch.micro_size=32"),
        ("batch.global_size=5000", "batch.global_size=5000 exceeds the 1,438 training samples"),
        ("trainer.precision=fp8", "trainer.precision='fp8' must be one of fp32, bf16, fp16"),
        ("plateau.patience=-1", "plateau.patience=-1 must be an integer >= 0"),
        ("logger.wandb.mode=loud", "logger.wandb.mode='loud' must be one of offline, online"),
    ],
)
def test_invalid_configs_are_refused_before_launch(digits_root, override, message):
    with pytest.raises((ConfigError, PlanError), match=re.escape(message)):
        trainer_checks(f"data.root={digits_root}", override)


@pytest.mark.slow
def test_the_trainer_refuses_a_bad_config_with_exit_2_and_one_line(digits_root, tmp_path):
    overrides = [f"data.root={digits_root}", f"run.root={tmp_path}", "trainer.precision=fp8"]
    out = harness.train(overrides, nproc=0, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: trainer.precision='fp8' must be one of fp32, bf16, fp16"
    ]
    assert "batch plan" not in out.stdout  # refused before any process group or training


def test_a_wrong_type_names_the_key(digits_root):
    with pytest.raises((HydraException, OmegaConfBaseException), match="batch.global_size"):
        trainer_checks(f"data.root={digits_root}", "batch.global_size=many")


def ddp_plan(capsys, *args: str) -> tuple[int, str, str]:
    """`ddp-plan ARGS` in-process: exit code, stdout, stderr."""
    try:
        plan_cli.main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("args", "iterations"),
    [
        (["num_samples=200", "batch.global_size=5", "batch.micro_size=5", "world_size=1"], 40),
        (["num_samples=1000", "batch.global_size=100", "batch.micro_size=10", "world_size=2"], 10),
    ],
)
def test_ddp_plan_prints_the_plan_without_data(capsys, args, iterations):
    code, out, err = ddp_plan(capsys, "--json", "data.root=/nonexistent", *args)
    assert code == 0, err
    assert json.loads(out)["iterations_per_epoch"] == iterations


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["batch.global_size=0"], "batch.global_size=0 must be >= 1"),
        (["batch.global_size=300"], "batch.global_size=300 exceeds the 200 training samples"),
        (
            ["batch.global_size=30", "batch.micro_size=4", "world_size=2"],
            "nearest valid: batch.global_size=24 or 32",
        ),
        (["batch.global_size=abc"], "batch.global_size"),
    ],
)
def test_ddp_plan_refuses_invalid_batches(capsys, args, message):
    code, _, err = ddp_plan(capsys, "num_samples=200", *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err


@pytest.mark.slow
def test_the_ddp_plan_command_refuses_with_exit_2_and_one_line():
    out = harness.run([str(BIN / "ddp-plan"), "num_samples=200", "batch.global_size=0"])
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: batch.global_size=0 must be >= 1"]


@pytest.fixture(scope="module")
def one_process(digits_root, tmp_path_factory):
    """One epoch of the smoke run by one plain python process, with a random per-sample
    shift named in the config. It runs in the background from the first test that asks;
    `one_process()` waits for it: (its output, its run directory)."""
    run_root = tmp_path_factory.mktemp("one-process")
    shift = ["+data.transform._target_=ddp.transforms.RandomShift", "+data.transform.pixels=1"]
    overrides = smoke_overrides(digits_root, run_root, "test", *shift, "trainer.max_epochs=1")
    run = harness.start(harness.trainer(overrides, nproc=0))
    yield lambda: (run.finish(), run_root / "test")
    run.kill()


@pytest.mark.slow
def test_a_per_sample_transform_from_config_is_applied(smoke, one_process):
    # Normalize with std=0 turns every input into inf/nan: the job must see it and stop.
    broken = [
        "+data.transform._target_=ddp.transforms.Normalize",
        "+data.transform.mean=0.5",
        "+data.transform.std=0.0",
        "trainer.nonfinite=stop",
    ]
    out = harness.train([*smoke, *broken], nproc=0)
    assert out.returncode == 3 and "non-finite loss at epoch 0 step 0" in out.stdout
    shifted, _ = one_process()  # RandomShift: a transform that keeps the inputs finite
    assert shifted.returncode == 0, shifted.stderr[-3000:]


@pytest.mark.slow
def test_single_process_with_plain_python(one_process):
    out, run_dir = one_process()
    assert out.returncode == 0, out.stderr[-3000:]
    assert summary(run_dir)["micro_batches_per_rank"] == [23 * 2]


@pytest.mark.slow
def test_streaming_mode_from_pipe_urls_keeps_equal_batches(digits_root, tmp_path, smoke):
    urls = f"pipe:cat {digits_root}/train/shard-{{000000..000005}}.tar"
    out = harness.train([*smoke, f"data.stream.urls='{urls}'", "data.stream.num_samples=1438"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert summary(tmp_path / "runs" / "test")["micro_batches_per_rank"] == [46, 46]


@pytest.mark.slow
@pytest.mark.parametrize(("setting", "expected"), [("null", True), ("false", False)])
def test_a_cnn_trains_in_channels_last_order_unless_told_not_to(tmp_path, smoke, setting, expected):
    overrides = [*smoke, "model=cnn", "model.channels=[8,16]"]  # 2 epochs
    out = harness.train([*overrides, f"trainer.channels_last={setting}"], nproc=0)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "runs" / "test"
    weight = checkpoint.load(run_dir / "checkpoints" / "last.pt")["model"][
        "features.3.weight"
    ]  # 8 -> 16 channels
    assert weight.is_contiguous(memory_format=torch.channels_last) == expected
    assert records(run_dir, "val")[-1]["val/accuracy"] > 0.3  # it learns either way (chance: 0.1)
