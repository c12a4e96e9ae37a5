"""The Tracker, read back from what it leaves on disk: the offline W&B run and metrics.jsonl.

W&B runs offline; `wandb leet inspect --json` reads the run's transaction log back.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ddp.plateau import PlateauTracker
from ddp.tracking.metrics_file import METRICS_FILE
from ddp.tracking.tracker import CURVES_FILE, Tracker
from tests import harness
from tests.configs import plateau_config, wandb_config
from tests.fixtures import smoke_overrides

PLAN = {"num_samples": 200, "global_size": 5, "micro_size": 5, "world_size": 1}
PLAN |= {"accumulate": 1, "iterations_per_epoch": 4}
CONFIG = {"optim": {"lr": 0.1}, "batch": {"global_size": 5}}
VAL_ACC = [0.5, 0.7, 0.7, 0.69, 0.7]  # best at epoch 1, then flat: a stop at epoch 3


@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def inspect_records(run_dir: Path) -> list[dict]:
    out = harness.wandb_inspect(wandb_run_dir(run_dir))
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def inspect_summary(run_dir: Path) -> dict:
    return json.loads(harness.wandb_inspect(wandb_run_dir(run_dir), "--summary"))


def wandb_run_dir(path: Path, index: int = -1) -> Path:
    """The offline W&B run under a run directory (or `path` itself when it is one)."""
    runs = sorted((path / "wandb").glob("offline-run-*"))
    return runs[index] if runs else path


def of_type(records: list[dict], kind: str) -> list[dict]:
    return [r[kind] for r in records if r["type"] == kind]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def train_epochs(tracker: Tracker, plateau: PlateauTracker, epochs: range, steps: int = 4):
    """A fake training loop calling the tracker as the trainer does."""
    for epoch in epochs:
        for i in range(steps):
            step = epoch * steps + i + 1
            tracker.log_train(step, {"train/loss": 1.0 / step, "epoch": epoch})
        epoch_metrics = {"train/epoch_loss": 1.0 / step, "train/epoch_accuracy": 0.9}
        epoch_metrics |= {"val/accuracy": VAL_ACC[epoch], "val/loss": 1 - VAL_ACC[epoch]}
        tracker.log_val(epoch, step, {**epoch_metrics, "audit/missing_samples": 0})
        event = plateau.update(epoch, VAL_ACC[epoch])
        if event is not None:
            tracker.log_event(epoch, event)
        if plateau.stopped:
            return


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "bs5"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        wandb_cfg = wandb_config(group="sweep-a", tags=["test"], mode="online")  # env wins
        tracker = Tracker.start(run_dir, CONFIG, PLAN, wandb_cfg, monitor="val/accuracy")
        plateau = PlateauTracker(plateau_config(patience=2))
        train_epochs(tracker, plateau, range(5))
        tracker.summary(
            best=plateau.best, best_epoch=plateau.best_epoch, stop_reason=plateau.stop_reason
        )
        tracker.save_curves()
        tracker.finish()
    return run_dir


def test_run_records_config_plan_and_group(finished_run):
    (run,) = of_type(inspect_records(finished_run), "run")
    config = run["config"]["update"]
    assert config["config"] == CONFIG and config["plan"] == PLAN
    assert run["run_group"] == "sweep-a" and run["job_type"] == "train"
    assert run["tags"] == ["test"] and run["display_name"] == "bs5"


def test_axes_train_by_global_step_val_by_epoch(finished_run):
    metrics = of_type(inspect_records(finished_run), "metric")
    by_glob = {m["glob_name"]: m for m in metrics if "glob_name" in m}
    assert by_glob["train/*"]["step_metric"] == "trainer/global_step"
    assert by_glob["val/*"]["step_metric"] == "epoch"
    assert by_glob["audit/*"]["step_metric"] == "epoch"  # extras logged per epoch
    (monitor,) = [m for m in metrics if m.get("name") == "val/accuracy"]
    assert monitor["summary"] == {"max": True} and monitor["step_metric"] == "epoch"


def test_history_holds_every_step_and_epoch(finished_run):
    history = [h["item"] for h in of_type(inspect_records(finished_run), "history")]
    train = [h for h in history if "train/loss" in h]
    assert [h["trainer/global_step"] for h in train] == list(range(1, 17))
    assert all(h["train/loss"] == pytest.approx(1 / h["trainer/global_step"]) for h in train)
    val = [(h["epoch"], h["val/accuracy"]) for h in history if "val/accuracy" in h]
    assert val == list(enumerate(VAL_ACC[:4]))


def test_plateau_stop_is_marked_and_alerted(finished_run):
    records = inspect_records(finished_run)
    history = [h["item"] for h in of_type(records, "history")]
    markers = [h for h in history if "plateau/stop" in h]
    assert [h["epoch"] for h in markers] == [3]
    (alert,) = of_type(records, "alert")
    assert alert["level"] == "WARN" and "epoch 3" in alert["title"]
    assert "val/accuracy" in alert["text"]


def test_summary_has_best_epoch_stop_reason_and_diagnosis(finished_run):
    summary = inspect_summary(finished_run)
    assert summary["state"] == "finished" and summary["exit_code"] == 0
    values = summary["summary"]
    assert values["best"] == 0.7 and values["best_epoch"] == 1
    assert "did not improve" in values["stop_reason"]
    assert values["val/accuracy"] == {"max": 0.7}
    assert values["diagnosis"]["verdict"] in ("converged", "overfit", "underfit", "improving")


def test_learning_curve_saved_and_logged(finished_run):
    assert (finished_run / CURVES_FILE).stat().st_size > 1000
    history = [h["item"] for h in of_type(inspect_records(finished_run), "history")]
    (image,) = [h for h in history if "curves/learning._type" in h]
    assert image["curves/learning._type"] == "image-file"
    assert image["curves/learning.path"].endswith(".png")


def test_metrics_file_records_the_same_numbers(finished_run):
    records = read_metrics(finished_run)
    plan = records[0]
    assert plan["kind"] == "plan" and plan["global_size"] == 5 and plan["config"] == CONFIG
    assert plan["wandb_run_id"] == inspect_summary(finished_run)["run_id"]
    assert (plan["run_name"], plan["group"]) == ("bs5", "sweep-a")  # ddp-report's labels
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 17))
    assert [r["epoch"] for r in train] == [e for e in range(4) for _ in range(4)]
    val = [(r["epoch"], r["step"], r["val/accuracy"]) for r in records if r["kind"] == "val"]
    assert val == [(e, 4 * e + 4, VAL_ACC[e]) for e in range(4)]
    (event,) = [r for r in records if r["kind"] == "event"]
    assert event["event"] == "stop" and event["epoch"] == 3 and event["plateau_start_epoch"] == 2
    (summary,) = [r for r in records if r["kind"] == "summary"]
    assert summary["best_epoch"] == 1
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed)


def test_other_ranks_write_nothing(tmp_path):
    run_dir = tmp_path / "run"
    tracker = Tracker.start(run_dir, CONFIG, PLAN, wandb_config(), main=False)
    train_epochs(tracker, PlateauTracker(plateau_config(patience=1)), range(3))
    tracker.summary(best=1.0)
    assert tracker.save_curves() is None and tracker.run_id is None
    tracker.finish()
    assert not run_dir.exists()


def test_without_wandb_the_metrics_file_is_still_written(tmp_path):
    with Tracker.start(tmp_path, CONFIG, PLAN, wandb_config(enabled=False)) as tracker:
        train_epochs(tracker, PlateauTracker(plateau_config(patience=9)), range(2))
        assert tracker.run_id is None
        tracker.save_curves()
    kinds = [r["kind"] for r in read_metrics(tmp_path)]
    assert kinds == ["plan"] + ["train"] * 4 + ["val"] + ["train"] * 4 + ["val"]
    assert not (tmp_path / "wandb").exists()


def test_wandb_mode_env_overrides_config(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_config(mode="online").resolved_mode() == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_config(mode="online").resolved_mode() == "online"


def test_resume_continues_the_same_run_without_duplicated_steps(tmp_path):
    plateau_cfg = plateau_config(patience=9)
    first = Tracker.start(tmp_path, CONFIG, PLAN, wandb_config(group="g"))
    train_epochs(first, PlateauTracker(plateau_cfg), range(3))  # steps 1..12
    run_id = first.run_id
    first.finish(exit_code=1)  # preempted; the checkpoint was at the end of epoch 1 (step 8)

    before = (tmp_path / "metrics.jsonl").read_bytes()
    resumed = Tracker.start(
        tmp_path, CONFIG, PLAN, wandb_config(group="g"), resume_run_id=run_id, resume_from_step=8
    )
    assert resumed.run_id == run_id
    # Nothing is written before `ready` (a start refused in between changes nothing).
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    resumed.ready()
    kept = read_metrics(tmp_path)[1:]
    assert [r["step"] for r in kept if r["kind"] == "train"] == list(range(1, 9))
    assert [r["step"] for r in kept if r["kind"] == "val"] == [4, 8]
    train_epochs(resumed, PlateauTracker(plateau_cfg), range(2, 4))
    resumed.finish()

    records = read_metrics(tmp_path)
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == list(range(1, 17))  # no step twice, none missing
    assert [r["epoch"] for r in records if r["kind"] == "val"] == [0, 1, 2, 3]
    assert len([r for r in records if r["kind"] == "plan"]) == 1
    # The resumed W&B run carries the same id and starts where the checkpoint was.
    assert inspect_summary(wandb_run_dir(tmp_path, -1))["run_id"] == run_id
    history = [h["item"] for h in of_type(inspect_records(wandb_run_dir(tmp_path, -1)), "history")]
    assert min(h["trainer/global_step"] for h in history if "train/loss" in h) == 9


def test_online_without_login_falls_back_to_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.setenv("WANDB_API_KEY", "")
    with pytest.warns(UserWarning, match="logging offline"):  # from W&B's start, a thread
        tracker = Tracker.start(tmp_path / "run", CONFIG, PLAN, wandb_config(mode="online"))
        tracker.finish()
    assert inspect_summary(tmp_path / "run")["run_id"] == tracker.run_id


def train_with_wandb(digits_root: Path, run_dir: Path, *extra: str) -> list[str]:
    """A 1-process smoke run with W&B (offline, not silenced): its console, stdout and
    stderr as they interleaved."""
    overrides = smoke_overrides(digits_root, run_dir.parent, run_dir.name, "logger=wandb", *extra)
    out = harness.train(overrides, nproc=0, merge_stderr=True, WANDB_SILENT="false")
    assert out.returncode == 0, out.stdout[-3000:]
    return out.stdout.strip().splitlines()


@pytest.mark.slow
def test_the_console_ends_with_done_and_one_wandb_line_says_where_the_run_is(digits_root, tmp_path):
    lines = train_with_wandb(digits_root, tmp_path / "runs" / "quiet")
    offline = wandb_run_dir(tmp_path / "runs" / "quiet")
    where = f"wandb: offline run in {offline}; sync with: wandb sync {offline}"
    assert [line for line in lines if line.startswith("wandb:")] == [where]
    assert lines[-1].startswith("done (max_epochs) after 46 iterations")
    # W&B's run is whole: its summary, and the console it captured, `done` line included.
    summary = inspect_summary(offline)
    assert summary["state"] == "finished" and summary["summary"]["stop_reason"] == "max_epochs"
    assert summary["console"][-1]["line"] == lines[-1]


@pytest.mark.slow
def test_console_summary_brings_back_wandbs_own_output(digits_root, tmp_path):
    lines = train_with_wandb(
        digits_root, tmp_path / "runs" / "loud", "logger.wandb.console_summary=true"
    )
    done = next(i for i, line in enumerate(lines) if line.startswith("done (max_epochs)"))
    after = lines[done + 1 :]
    assert "wandb: Run summary:" in after and "wandb: Run history:" in after
    offline = wandb_run_dir(tmp_path / "runs" / "loud")
    assert f"wandb: wandb sync {offline}" in after
    assert not any(line.startswith("wandb: offline run in") for line in lines)  # not ours


CURVE_RECORDS = [
    {
        "kind": "val",
        "epoch": e,
        "step": 10 * e,
        "val/accuracy": 0.5 + e / 10,
        "val/loss": 1 / (e + 1),
    }
    for e in range(4)
]


def test_the_curves_are_drawn_by_the_helper_process(tmp_path):
    script = f"""
import sys
from pathlib import Path
from ddp.curves import plot_in_helper
records = {CURVE_RECORDS!r}
plot_in_helper(records, Path({str(tmp_path / "c.png")!r}), best_epoch=3, title="t")
assert "matplotlib" not in sys.modules, "drawn in the trainer's process"
"""
    out = harness.run([sys.executable, "-c", script], timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_its_helper_the_curves_are_drawn_in_process(tmp_path, monkeypatch):
    from ddp import curves

    monkeypatch.setattr(curves.sys, "executable", str(tmp_path / "no-such-python"))
    curves.plot_in_helper(CURVE_RECORDS, tmp_path / "c.png", best_epoch=3)
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
