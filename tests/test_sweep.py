"""A real batch-size sweep (`-m experiment=batch_sweep`), read back as a reviewer would.

One 2-point sweep runs once for the module (basic launcher: the points one after another in
one process). Its offline W&B runs are read back with W&B's own reader (`wandb leet inspect`),
its table with `ddp-report`, both checked against the metrics.jsonl files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests import harness
from tests.harness import records

pytestmark = pytest.mark.slow

BATCHES = (64, 128)
NUM_SAMPLES = 1438  # digits train split
VERDICTS = {"underfit", "overfit", "converged", "improving"}
# No epoch can beat the best accuracy by a whole unit: epoch 1 is a plateau, and a stop.
SHORT_RUN = [
    "trainer.max_epochs=3",
    "plateau.patience=1",
    "plateau.min_delta=1.0",
    "plateau.warmup_epochs=0",
]


def point_overrides(batch: int) -> str:
    """Hydra's override_dirname of one point: its overrides, sorted, paths excluded."""
    return ",".join(sorted([f"batch.global_size={batch}", *SHORT_RUN]))


@pytest.fixture(scope="module")
def sweep(digits_root, tmp_path_factory) -> Path:
    run_root = tmp_path_factory.mktemp("runs")
    overrides = [
        "experiment=batch_sweep",
        f"batch.global_size={','.join(map(str, BATCHES))}",  # replaces the config's 4 points
        f"run.root={run_root}",
        f"data.root={digits_root}",
        *SHORT_RUN,
    ]
    out = harness.run([sys.executable, "-m", "ddp.train", "-m", *overrides], timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (sweep_dir,) = run_root.glob("sweep-*")
    return sweep_dir


def points(sweep: Path) -> list[Path]:
    return [sweep / str(num) for num in range(len(BATCHES))]


def inspect(run_dir: Path, *flags: str) -> str:
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    return harness.wandb_inspect(wandb_run, *flags)


def wandb_records(run_dir: Path, kind: str) -> list[dict]:
    lines = [json.loads(line) for line in inspect(run_dir).splitlines() if line.strip()]
    return [r[kind] for r in lines if r["type"] == kind]


def test_each_point_runs_in_a_numbered_dir_of_one_sweep(sweep):
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for run_dir, batch in zip(points(sweep), BATCHES, strict=True):
        plan = records(run_dir, "plan")[0]
        assert plan["global_size"] == batch and plan["micro_size"] == 8
        assert plan["iterations_per_epoch"] == -(-NUM_SAMPLES // batch)  # padded, not dropped
        assert plan["config"]["schedule"]["lr_scaling"] == "sqrt"
        assert (run_dir / "learning_curves.png").stat().st_size > 0


def test_runs_of_the_sweep_share_one_wandb_group(sweep):
    runs = [wandb_records(p, "run")[0] for p in points(sweep)]
    assert {r["run_group"] for r in runs} == {sweep.name}
    assert runs[0]["run_id"] != runs[1]["run_id"]
    assert all("batch_sweep" in r["tags"] for r in runs)
    for run_dir, run in zip(points(sweep), runs, strict=True):
        plan = records(run_dir, "plan")[0]
        assert (plan["run_name"], plan["group"]) == (run["display_name"], run["run_group"])


def test_run_names_are_the_experiment_and_the_swept_override(sweep):
    for run_dir, batch in zip(points(sweep), BATCHES, strict=True):
        (run,) = wandb_records(run_dir, "run")
        experiment = run["config"]["update"]["config"]["experiment_name"]
        # Paths (data.root, run.root) and `experiment=` are excluded from the name.
        assert run["display_name"] == f"{experiment}-{point_overrides(batch)}"


def test_experiment_name_comes_from_the_experiment_config(sweep):
    names = {wandb_records(p, "run")[0]["display_name"] for p in points(sweep)}
    assert names == {f"batch_sweep-{point_overrides(b)}" for b in BATCHES}


def test_val_metrics_by_epoch_train_metrics_by_global_step(sweep):
    run_dir = points(sweep)[0]
    metrics = wandb_records(run_dir, "metric")
    axes = {m.get("glob_name") or m.get("name"): m.get("step_metric") for m in metrics}
    assert axes["train/*"] == "trainer/global_step"
    assert axes["val/*"] == "epoch" and axes["plateau/*"] == "epoch"
    history = [h["item"] for h in wandb_records(run_dir, "history")]
    train = [h["trainer/global_step"] for h in history if "train/loss" in h]
    val = [(h["epoch"], h["val/accuracy"]) for h in history if "val/accuracy" in h]
    assert train == [r["step"] for r in records(run_dir, "train")] == [10, 20, 30, 40]
    assert val == [(r["epoch"], r["val/accuracy"]) for r in records(run_dir, "val")]


def test_summary_has_best_stop_reason_and_diagnosis(sweep):
    for run_dir in points(sweep):
        summary = json.loads(inspect(run_dir, "--summary"))
        summary = summary.get("summary", summary)
        val = records(run_dir, "val")
        assert [r["epoch"] for r in val] == [0, 1]  # stopped by the plateau, not max_epochs
        assert summary["best_value"] == val[0]["val/accuracy"] and summary["best_epoch"] == 0
        assert summary["stop_reason"] == "plateau"
        assert summary["diagnosis"]["verdict"] in VERDICTS
        assert records(run_dir, "summary")[-1]["diagnosis"] == summary["diagnosis"]


def test_plateau_event_is_logged_and_alerted(sweep):
    for run_dir in points(sweep):
        (event,) = records(run_dir, "event")
        assert (event["event"], event["epoch"], event["plateau_start_epoch"]) == ("stop", 1, 1)
        history = [h["item"] for h in wandb_records(run_dir, "history")]
        assert [h["epoch"] for h in history if "plateau/stop" in h] == [1]
        (alert,) = wandb_records(run_dir, "alert")
        assert alert["title"] == "stop at epoch 1" and alert["level"] == "WARN"


def test_report_table_matches_the_metrics_files(sweep):
    out = harness.run([sys.executable, "-m", "ddp.report", str(sweep)], timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["run", "global", "batch"]
    rows = {line.split()[0]: line.split() for line in lines[2:] if line[:1].isdigit()}
    assert set(rows) == {"0", "1"}
    for run_dir, batch in zip(points(sweep), BATCHES, strict=True):
        plan, val = records(run_dir, "plan")[0], records(run_dir, "val")
        summary = records(run_dir, "summary")[-1]
        wall = max(r["elapsed_s"] for r in records(run_dir))
        rates = sorted(r["train/samples_per_s"] for r in val)
        expected = [
            run_dir.name,
            str(batch),
            str(plan["iterations_per_epoch"]),
            "2",  # epochs run when the plateau fired (epoch 1, counted from 0)
            f"{summary['best_value']:.4f}",
            str(summary["best_epoch"]),
            f"{wall:.1f}",
            f"{rates[len(rates) // 2]:.1f}",
            "plateau",
            summary["diagnosis"]["verdict"],
            plan["run_name"],
        ]
        row = rows[run_dir.name]
        steps, samples, noise = row[8:11]
        assert row[:8] + row[11:] == expected
        # Steps to the worst point's best, the samples they took, the noise scale measured.
        assert abs(float(steps) * batch - float(samples.replace(",", ""))) <= batch
        assert float(noise.replace(",", "")) > 0
    assert (sweep / "sweep.png").stat().st_size > 1000


def test_a_sweep_runs_on_two_processes_under_torchrun(digits_root, tmp_path):
    # Each point starts a new process group in the same processes: it needs fresh store keys.
    overrides = [
        "experiment=batch_sweep",
        "batch.global_size=32,64",
        "trainer.max_steps=2",
        "trainer.timeout_s=15",  # a hang fails in seconds, not minutes
        f"run.root={tmp_path}",
        f"data.root={digits_root}",
    ]
    out = harness.run([*harness.torchrun(2), "-m", "ddp.train", "-m", *overrides], timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    (sweep_dir,) = tmp_path.glob("sweep-torchrun-*")
    for num, global_size in enumerate((32, 64)):
        summary = records(sweep_dir / str(num), "summary")[-1]
        accumulate = global_size // (8 * 2)
        assert summary["micro_batches_per_rank"] == [2 * accumulate] * 2
        assert summary["stop_reason"] == "max_steps"
