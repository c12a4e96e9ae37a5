"""Where the time goes (ddp.perf, docs/performance.md): the step-time breakdown, the
data-bottleneck line, FLOPs and MFU, traces, memory. The CUDA parts (events, the peak
table, the out-of-memory snapshot) are in tests/test_cuda.py."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from ddp import checkpoint
from ddp.models import MLP, SmallCNN
from ddp.perf.flops import count_flops_per_sample, perf_metrics
from ddp.perf.timing import Breakdown, StepTimer
from tests import harness
from tests.fixtures import smoke_overrides

PARTS = ("time/data", "time/compute", "time/comm", "time/optimizer", "time/other")


def mlp_training_flops(sizes: list[int]) -> int:
    """Analytically: 2 FLOPs per multiply-add of each Linear, the backward twice the forward."""
    forward = sum(2 * a * b for a, b in zip(sizes, sizes[1:], strict=False))
    return 3 * forward


def test_mlp_flops_per_sample_are_its_matrix_multiplies():
    flops = count_flops_per_sample(MLP(64, 10, hidden=(128, 64)), torch.zeros(32, 1, 8, 8))
    assert flops == pytest.approx(mlp_training_flops([64, 128, 64, 10]), rel=0.01)


def test_cnn_flops_per_sample_count_its_convolutions():
    flops = count_flops_per_sample(SmallCNN(1, 10, (32, 64)), torch.zeros(4, 1, 8, 8))
    conv = 2 * 8 * 8 * 9 * (1 * 32 + 32 * 64)  # both at 8x8 (the pool follows the second)
    assert flops == pytest.approx(3 * (conv + 2 * 64 * 10), rel=0.01)


def test_counting_flops_changes_nothing_of_the_run():
    model = SmallCNN(1, 10, (8, 16), dropout=0.5)
    model.features[1].eval()  # a module the user froze stays frozen
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = torch.rand(4, 1, 8, 8)
    rng = torch.random.get_rng_state()
    count_flops_per_sample(model, inputs)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # BN stats
    assert model.training and not model.features[1].training
    assert all(p.grad is None for p in model.parameters())


def test_achieved_tflops_and_mfu_follow_from_throughput():
    m = perf_metrics(1e9, samples_per_s=2000.0, world_size=2, peak=0.5)
    assert m["perf/tflops"] == pytest.approx(1.0)  # 1 GFLOP x 1000 samples/s per process
    assert m["perf/mfu"] == pytest.approx(2.0)
    assert perf_metrics(None, 2000.0, 2, 0.5) == {}
    assert "perf/mfu" not in perf_metrics(1e9, 2000.0, 2, None)


def test_fractions_sum_to_one_and_other_is_the_rest():
    shares = Breakdown(
        {"data": 1.0, "compute": 2.0, "comm": 0.5, "optimizer": 0.5}, 5.0
    ).fractions()
    assert shares == pytest.approx(
        {"data": 0.2, "compute": 0.4, "comm": 0.1, "optimizer": 0.1, "other": 0.2}
    )
    over = Breakdown({"data": 1.0, "compute": 2.0, "comm": 0.5, "optimizer": 0.5}, 3.9).fractions()
    assert sum(over.values()) == pytest.approx(1.0) and over["other"] == 0.0


def test_the_timer_splits_a_step_at_its_marks():
    timer = StepTimer(torch.device("cpu"))  # marks set by hand: 0.25 s apart
    marks = iter([0.0, 0.25, 0.5, 0.75, 1.0])  # start, data, grads_ready, fb, optimizer
    for name in ("start", "data", "grads_ready", "forward_backward", "optimizer"):
        timer._marks[name] = next(marks)
    timer.end_step()
    seconds = timer.epoch().seconds
    assert seconds == pytest.approx(
        {"data": 0.25, "compute": 0.25, "comm": 0.25, "optimizer": 0.25}
    )
    timer._marks = {"start": 0.0, "data": 1.0}  # a step a stop left half-way: not counted
    timer.end_step()
    assert sum(timer.epoch().seconds.values()) == 0.0


@pytest.fixture(scope="module")
def profiled(digits_root: Path, tmp_path_factory) -> Path:
    """2 processes, in-memory digits, steps 5..8 traced (a checkpoint after step 6), W&B."""
    root = tmp_path_factory.mktemp("perf")
    extra = [
        "trainer.profile=[5,8]",
        "trainer.checkpoint.every_steps=6",
        "trainer.peak_tflops=0.01",
        "trainer.count_flops=true",  # (off in experiment=smoke)
        "logger=wandb",
    ]
    out = harness.train(smoke_overrides(digits_root, root, "profiled", *extra))
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "profiled"


def test_every_epoch_says_where_its_time_went(profiled):
    val = harness.records(profiled, "val")
    for record in val:
        assert sum(record[k] for k in PARTS) == pytest.approx(1.0, abs=0.01)
        assert record["time/comm"] > 0  # 2 processes wait for their all-reduce
        assert record["memory/peak_gb"] > 0.05  # a Python process with torch, in GB
    # The epoch's wall time is the time between its record and the one before (within 5%,
    # or 20 ms: a record is stamped after the epoch's all-reduces, whose wait varies).
    between = val[1]["time"] - val[0]["time"]
    assert val[1]["time/wall_s"] == pytest.approx(between, rel=0.05, abs=0.02)
    # The split is served from memory: its micro-batches are a gather away.
    assert val[1]["time/data"] < 0.15
    train = harness.records(profiled, "train")
    steps = [f"train/{k}" for k in PARTS]  # rank 0's, since the record before
    assert train and all(sum(r[k] for k in steps) == pytest.approx(1.0, abs=0.01) for r in train)


def test_w_and_b_holds_the_same_figures(profiled):
    (offline,) = (profiled / "wandb").glob("offline-run-*")
    summary = json.loads(harness.wandb_inspect(offline, "--summary"))["summary"]
    last = harness.records(profiled, "val")[-1]
    for key in (*PARTS, "memory/peak_gb", "perf/tflops", "perf/mfu"):
        assert summary[key] == pytest.approx(last[key]), key
    assert "train/time/data" in summary  # the step-level breakdown, against the global step


def test_flops_and_mfu_are_recorded(profiled):
    plan = harness.records(profiled, "plan")[0]
    assert plan["perf/flops_per_sample"] == pytest.approx(mlp_training_flops([64, 128, 64, 10]))
    for record in harness.records(profiled, "val"):
        tflops = plan["perf/flops_per_sample"] * record["train/samples_per_s"] / 2 / 1e12
        assert record["perf/tflops"] == pytest.approx(tflops)
        assert record["perf/mfu"] == pytest.approx(tflops / 0.01)


def test_a_profile_holds_the_labelled_steps_of_every_rank(profiled):
    traces = sorted((profiled / "profile").iterdir())
    assert [t.name for t in traces] == ["rank0-steps5-8.json.gz", "rank1-steps5-8.json.gz"]
    for trace in traces:
        events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
        names = [e.get("name") for e in events if e.get("ph") == "X"]
        for label in ("data", "forward_backward", "optimizer"):
            assert names.count(label) == 4, (trace.name, label)  # steps 5, 6, 7, 8
        assert names.count("checkpoint") == 1  # after step 6


def test_a_slow_transform_makes_the_data_wait_dominate(digits_root, tmp_path):
    slow = [
        "+data.transform._target_=tests.workers.perf_parts.Sleep",
        "+data.transform.seconds=0.002",
    ]
    out = harness.train(smoke_overrides(digits_root, tmp_path, "slow", *slow), nproc=0)
    assert out.returncode == 0, out.stderr[-3000:]
    for record in harness.records(tmp_path / "slow", "val"):
        assert record["time/data"] > 0.5
    lines = [line for line in out.stdout.splitlines() if "waited for data" in line]
    assert len(lines) == 1, out.stdout  # both epochs waited: said once
    assert lines[0].startswith("note: epoch 0 waited for data ")
    assert "data.loader.num_workers (now 0)" in lines[0]
    epoch_lines = [line for line in out.stdout.splitlines() if line.startswith("epoch ")]
    assert all(" | data " in line for line in epoch_lines) and len(epoch_lines) == 2


def test_a_model_the_counter_cannot_run_trains_without_the_figure(digits_root, tmp_path):
    model = ["model._target_=tests.workers.perf_parts.Uncalibrated", "trainer.max_epochs=1"]
    model.append("trainer.count_flops=true")
    out = harness.train(smoke_overrides(digits_root, tmp_path, "values", *model), nproc=0)
    assert out.returncode == 0, out.stderr[-3000:]
    notes = [line for line in out.stdout.splitlines() if "FLOPs cannot be counted" in line]
    assert len(notes) == 1 and "only once training has calibrated it" in notes[0], out.stdout
    (val,) = harness.records(tmp_path / "values", "val")
    assert "perf/tflops" not in val and val["time/compute"] > 0
    assert harness.records(tmp_path / "values", "plan")[0]["perf/flops_per_sample"] is None


def test_a_run_resumed_at_an_epochs_end_counts_its_flops_on_the_next_epoch(digits_root, tmp_path):
    """Stopped after the last step of epoch 0 (before its evaluation), the run resumes
    with no micro-batch left to count on: it counts on epoch 1's first, and its weights
    are those of a run that never counted."""
    run = smoke_overrides(digits_root, tmp_path, "end", "trainer.count_flops=true")
    first = harness.train([*run, "trainer.max_steps=23"], nproc=0)  # 23 iterations an epoch
    assert first.returncode == 0, first.stderr[-3000:]
    again = harness.train(run, nproc=0)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(continuing at epoch 0 step 23" in again.stdout
    epoch0, epoch1 = harness.records(tmp_path / "end", "val")
    assert "perf/tflops" not in epoch0 and epoch1["perf/tflops"] > 0
    # Counting, at start-up or inside the loop, changes nothing the run trains:
    straight = harness.train(smoke_overrides(digits_root, tmp_path, "straight"), nproc=0)
    assert straight.returncode == 0, straight.stderr[-3000:]
    weights = [
        checkpoint.load(tmp_path / name / "checkpoints" / "last.pt")["model"]
        for name in ("end", "straight")
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])
