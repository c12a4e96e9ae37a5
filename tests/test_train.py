"""The main job end to end: 2 processes under torchrun, gloo, digits shards."""

import json
import math
import subprocess

import pytest
import torch

from ddp import checkpoint
from tests import harness
from tests.harness import BIN, ROOT, records

pytestmark = pytest.mark.slow


def summary(run_dir):
    return records(run_dir, "summary")[-1]


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
    inspect = [str(BIN / "wandb"), "leet", "inspect", "--summary", "--json", str(run_dir / "wandb")]
    wandb_summary = json.loads(
        subprocess.run(inspect, capture_output=True, text=True, check=True).stdout
    )
    text = json.dumps(wandb_summary)
    for key in ("best_value", "best_epoch", "stop_reason", "val/accuracy", "train/loss"):
        assert key in text, key


@pytest.mark.parametrize("memory_mb", [256, 0], ids=["memory", "shards"])
def test_ranks_run_the_same_steps_and_every_sample_once(
    digits_root, tmp_path, base_overrides, memory_mb
):
    out = harness.train(
        [
            *base_overrides,
            f"data.in_memory_max_mb={memory_mb}",
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


def test_no_sync_accumulation_equals_one_big_batch(tmp_path):
    out_file = tmp_path / "params.pt"
    cmd = [*harness.torchrun(2), str(ROOT / "tests/workers/accumulate.py"), str(out_file), "4", "3"]
    out = harness.run(cmd, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    saved = torch.load(out_file, weights_only=True)

    from ddp.models import MLP

    torch.manual_seed(0)
    model = MLP(64, 10, hidden=(32,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    logits = model(saved["inputs"])
    torch.nn.functional.cross_entropy(logits, saved["targets"]).backward()
    optimizer.step()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(saved["params"][name], value, rtol=1e-5, atol=1e-6)

    # The step sums rode on the gradient all-reduce: the same totals on both ranks.
    seen = [json.loads((tmp_path / f"params.pt.sums-rank{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] == seen[1]
    first, second = seen[0]
    assert first["carried"] and second["carried"]
    assert first["count"] == 2 * 4 * 3 and first["preempt"] == 1.0  # raised by rank 1 only
    loss = torch.nn.functional.cross_entropy(logits.detach(), saved["targets"], reduction="sum")
    assert first["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert second["preempt"] == 0.0 and math.isnan(second["loss"])  # rank 1's NaN, seen by all


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
def test_invalid_configs_are_refused_before_launch(digits_root, tmp_path, override, message):
    out = harness.train(
        [f"data.root={digits_root}", f"run.root={tmp_path}", override], nproc=0, timeout=60
    )
    assert out.returncode == 2
    assert f"error: {message}" in out.stderr
    assert "batch plan" not in out.stdout  # refused before any process group or training


def test_a_wrong_type_names_the_key(digits_root, tmp_path):
    out = harness.train([f"data.root={digits_root}", "batch.global_size=many"], nproc=0, timeout=60)
    assert out.returncode != 0
    assert "batch.global_size" in out.stderr


@pytest.mark.parametrize(
    ("args", "iterations"),
    [
        (["num_samples=200", "batch.global_size=5", "batch.micro_size=5", "world_size=1"], 40),
        (["num_samples=1000", "batch.global_size=100", "batch.micro_size=10", "world_size=2"], 10),
    ],
)
def test_ddp_plan_prints_the_plan_without_data(args, iterations):
    out = subprocess.run(
        [str(BIN / "ddp-plan"), "--json", "data.root=/nonexistent", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["iterations_per_epoch"] == iterations


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
def test_ddp_plan_refuses_invalid_batches(args, message):
    out = subprocess.run(
        [str(BIN / "ddp-plan"), "num_samples=200", *args], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr


def test_single_process_with_plain_python(digits_root, tmp_path, base_overrides):
    out = harness.train([*base_overrides, "trainer.max_epochs=1"], nproc=0)
    assert out.returncode == 0, out.stderr[-3000:]
    assert summary(tmp_path / "runs" / "test")["micro_batches_per_rank"] == [23 * 2]


def test_a_per_sample_transform_from_config_is_applied(digits_root, tmp_path, base_overrides):
    # Normalize with std=0 turns every input into inf/nan: the job must see it and stop.
    broken = [
        "+data.transform._target_=ddp.transforms.Normalize",
        "+data.transform.mean=0.5",
        "+data.transform.std=0.0",
        "trainer.nonfinite=stop",
    ]
    out = harness.train([*base_overrides, *broken], nproc=0)
    assert out.returncode == 3 and "non-finite loss at epoch 0 step 0" in out.stdout
    fine = ["+data.transform._target_=ddp.transforms.RandomShift", "+data.transform.pixels=1"]
    assert harness.train([*base_overrides, *fine, "trainer.max_epochs=1"], nproc=0).returncode == 0


def test_streaming_mode_from_pipe_urls_keeps_equal_batches(digits_root, tmp_path, base_overrides):
    urls = f"pipe:cat {digits_root}/train/shard-{{000000..000005}}.tar"
    out = harness.train([*base_overrides, f"data.urls='{urls}'", "data.num_samples=1438"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert summary(tmp_path / "runs" / "test")["micro_batches_per_rank"] == [46, 46]


@pytest.mark.parametrize(("setting", "expected"), [("null", True), ("false", False)])
def test_a_cnn_trains_in_channels_last_order_unless_told_not_to(
    digits_root, tmp_path, base_overrides, setting, expected
):
    overrides = [*base_overrides, "model=cnn", "model.channels=[8,16]", "trainer.max_epochs=2"]
    out = harness.train([*overrides, f"trainer.channels_last={setting}"], nproc=0)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "runs" / "test"
    weight = checkpoint.load(run_dir / "checkpoints" / "last.pt")["model"][
        "features.3.weight"
    ]  # 8 -> 16 channels
    assert weight.is_contiguous(memory_format=torch.channels_last) == expected
    assert records(run_dir, "val")[-1]["val/accuracy"] > 0.5  # it learns either way
