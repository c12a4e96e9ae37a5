"""`ddp-report` against the metrics files it reads, and the curve diagnosis it relies on."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ddp.curves import diagnose, epoch_records, plot_learning_curves
from ddp.plateau import PlateauTracker
from ddp.report import SWEEP_PLOT, find_run_dirs, main
from ddp.tracking.metrics_file import METRICS_FILE
from ddp.tracking.tracker import Tracker
from tests import harness
from tests.configs import plateau_config, wandb_config

NUM_SAMPLES = 200


def fake_run(
    run_dir: Path, global_size: int, val_acc: list[float], samples_per_s: float | None = None
) -> None:
    """A run as the trainer leaves it (no W&B), stopped by the plateau tracker."""
    iters = NUM_SAMPLES // global_size
    plan = {"num_samples": NUM_SAMPLES, "global_size": global_size, "iterations_per_epoch": iters}
    plateau = PlateauTracker(plateau_config(patience=2))
    with Tracker.start(
        run_dir, {"batch": {"global_size": global_size}}, plan, wandb_config(enabled=False)
    ) as tr:
        for epoch, acc in enumerate(val_acc):
            for i in range(iters):
                tr.log_train(epoch * iters + i + 1, {"train/loss": 1.0 - acc}, epoch=epoch)
            metrics = {"val/accuracy": acc, "val/loss": 1.0 - acc}
            if samples_per_s is not None:  # the trainer's own per-epoch throughput
                metrics["train/samples_per_s"] = samples_per_s * (1 + epoch % 2)
            tr.log_val(epoch, (epoch + 1) * iters, metrics)
            event = plateau.update(epoch, acc)
            if event is not None:
                tr.log_event(epoch, event)
            if plateau.stopped:
                break
        tr.summary(
            best=plateau.best, best_epoch=plateau.best_epoch, stop_reason=plateau.stop_reason
        )


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A Hydra multirun layout: one numbered run dir per global batch, plus clutter."""
    root = tmp_path / "multirun"
    fake_run(root / "0", 5, [0.5, 0.6, 0.6, 0.6, 0.7])  # plateau stop at epoch 3
    fake_run(root / "1", 20, [0.4, 0.5, 0.55, 0.58], samples_per_s=1000.0)  # no plateau
    (root / ".hydra").mkdir()
    (root / "notes").mkdir()
    (root / "notes" / METRICS_FILE).write_text('{"kind": "train", "step": 1}\n')
    return root


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The table's rows by run name: the lines after its header, up to the first blank one."""
    table = stdout.split("\n\n")[0].splitlines()
    return {line.split()[0]: line.split() for line in table[2:] if line.strip()}


def test_finds_runs_by_their_plan_record(sweep):
    assert find_run_dirs([sweep]) == [sweep / "0", sweep / "1"]
    assert find_run_dirs([sweep / "1"]) == [sweep / "1"]


def test_table_matches_the_metrics_files(sweep, capsys):
    assert main([str(sweep)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert set(rows) == {"0", "1"}
    for name, (batch, iters, to_plateau, best, best_epoch) in {
        "0": (5, 40, "4", 0.6, 1),
        "1": (20, 10, "-", 0.58, 3),
    }.items():
        row = rows[name]
        assert row[1:6] == [str(batch), str(iters), to_plateau, f"{best:.4f}", str(best_epoch)]
        records = [
            json.loads(line) for line in (sweep / name / METRICS_FILE).read_text().splitlines()
        ]
        wall = max(r["elapsed_s"] for r in records)
        last_train = [r for r in records if r["kind"] == "train"][-1]
        assert float(row[6]) == pytest.approx(wall, abs=0.05)
        if name == "0":  # no throughput logged: samples trained over wall time
            expected_rate = last_train["step"] * batch / last_train["elapsed_s"]
            assert float(row[7]) == pytest.approx(expected_rate, rel=0.01, abs=0.1)
        else:  # median of the logged per-epoch figures 1000, 2000, 1000, 2000
            assert float(row[7]) == 2000.0


def test_steps_to_the_worst_runs_best_are_interpolated_between_validations(sweep, capsys):
    """Target 0.58, the worst run's best. Run 0 (G=5, 40 steps an epoch) validates 0.5 at
    step 40 and 0.6 at step 80: it crosses 0.58 at step 72 (360 samples); run 1 (G=20)
    reaches it at its fourth validation, step 40 (800 samples). Two runs: no fit."""
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert rows["0"][8:10] == ["72", "360"] and rows["1"][8:10] == ["40", "800"]
    assert "target: val/accuracy 0.5800 (the worst run's best" in out
    assert "fit (S/S_min - 1)(E/E_min - 1) = 1: none" in out


def test_writes_one_comparison_plot(sweep, tmp_path):
    assert main([str(sweep)]) == 0
    assert (sweep / SWEEP_PLOT).stat().st_size > 1000
    out = tmp_path / "plots" / "cmp.png"
    assert main([str(sweep / "0"), str(sweep / "1"), "--out", str(out)]) == 0
    assert out.exists()


def test_runs_as_a_command_and_reports_missing_dirs(sweep, tmp_path):
    cmd = [sys.executable, "-m", "ddp.report"]
    ok = harness.run([*cmd, str(sweep)], timeout=120)
    assert ok.returncode == 0 and "global batch" in ok.stdout
    missing = harness.run([*cmd, str(tmp_path / "nope")], timeout=120)
    assert missing.returncode == 2 and "nope" in missing.stderr
    empty = harness.run([*cmd, str(sweep / "notes")], timeout=120)
    assert empty.returncode == 1 and "plan record" in empty.stderr


def test_table_shows_stop_reason_diagnosis_and_wandb_name(sweep, capsys):
    assert main([str(sweep)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-4:] == ["stop", "diagnosis", "W&B", "name"]
    rows = table_rows("\n".join(lines))
    assert rows["0"][11].startswith("plateau:") and rows["0"][-1] == "0"  # name: the dir's
    assert rows["1"][11] == "-"  # the fake run ran out of epochs: no stop reason given


def test_best_is_the_summarys_when_the_run_finished(tmp_path, capsys):
    """A gain below plateau.min_delta is no new best for the tracker (nor for best.pt)."""
    run_dir = tmp_path / "sweep" / "0"
    wandb = wandb_config(enabled=False, name="exp-batch.global_size=5", group="sweep")
    with Tracker.start(run_dir, {}, {"global_size": 5, "iterations_per_epoch": 40}, wandb) as tr:
        for epoch, acc in enumerate([0.5, 0.8, 0.805]):
            tr.log_val(epoch, 40 * (epoch + 1), {"val/accuracy": acc})
        tr.summary(best_value=0.8, best_epoch=1, stop_reason="max_epochs")
    assert main([str(tmp_path / "sweep")]) == 0
    row = table_rows(capsys.readouterr().out)["0"]
    assert row[4:6] == ["0.8000", "1"] and row[11] == "max_epochs"
    assert row[-1] == "exp-batch.global_size=5"


# ---- curves: per-epoch records, plot, diagnosis


def rows(train_acc, val_acc, train_loss=None, val_loss=None) -> list[dict]:
    out = []
    for epoch, (ta, va) in enumerate(zip(train_acc, val_acc, strict=True)):
        row = {"epoch": epoch, "train/accuracy": ta, "val/accuracy": va}
        if train_loss is not None:
            row["train/loss"], row["val/loss"] = train_loss[epoch], val_loss[epoch]
        out.append(row)
    return out


def test_epoch_records_average_train_steps_and_keep_val():
    records = [
        {"kind": "plan"},
        {"kind": "train", "step": 1, "epoch": 0, "train/loss": 2.0},
        {"kind": "train", "step": 2, "epoch": 0, "train/loss": 1.0},
        {"kind": "val", "step": 2, "epoch": 0, "val/loss": 1.7},
        {"kind": "train", "step": 3, "epoch": 1, "train/loss": 0.5},
        {"kind": "val", "step": 3, "epoch": 1, "val/loss": 1.2, "train/loss": 0.4},
    ]
    assert epoch_records(records) == [
        {"epoch": 0, "step": 2, "train/loss": 1.5, "val/loss": 1.7},
        {"epoch": 1, "step": 3, "train/loss": 0.4, "val/loss": 1.2},  # exact value wins
    ]


def test_epoch_records_prefer_the_trainers_exact_epoch_values():
    records = [
        {"kind": "train", "step": 1, "epoch": 0, "train/loss": 2.0},
        {
            "kind": "val",
            "step": 1,
            "epoch": 0,
            "train/epoch_loss": 1.9,
            "train/epoch_accuracy": 0.3,
        },
    ]
    (row,) = epoch_records(records)
    assert row["train/loss"] == 1.9 and row["train/accuracy"] == 0.3


def test_plot_accepts_runs_without_accuracy(tmp_path):
    records = [{"kind": "val", "step": 1, "epoch": e, "val/loss": 1 / (e + 1)} for e in range(3)]
    out = plot_learning_curves(records, tmp_path / "c.png", best_epoch=2, plateau_epochs=(1, 2))
    assert out.stat().st_size > 1000


def test_diagnose_improving_while_validation_still_rises():
    d = diagnose(rows([0.8, 0.85, 0.9, 0.92], [0.7, 0.75, 0.8, 0.82]))
    assert d.verdict == "improving" and d.plateau_epoch is None


def test_diagnose_underfit_when_training_is_poor_and_improving():
    d = diagnose(rows([0.2, 0.3, 0.35, 0.4], [0.2, 0.28, 0.33, 0.38]))
    assert d.verdict == "underfit" and "train/accuracy" in d.reason


def test_diagnose_underfit_when_both_plateau_poor():
    d = diagnose(rows([0.3, 0.4, 0.4, 0.4, 0.4], [0.3, 0.4, 0.395, 0.4, 0.395]))
    assert d.verdict == "underfit" and d.plateau_epoch == 2


def test_diagnose_overfit_when_validation_worsens_as_training_improves():
    train_loss, val_loss = [1.0, 0.6, 0.4, 0.25, 0.15, 0.1], [1.0, 0.7, 0.6, 0.65, 0.75, 0.9]
    d = diagnose(
        rows(
            [0.6, 0.8, 0.9, 0.95, 0.98, 0.99],
            [0.6, 0.75, 0.8, 0.78, 0.75, 0.72],
            train_loss,
            val_loss,
        )
    )
    assert d.verdict == "overfit" and d.plateau_epoch == 3
    assert "worse" in d.reason


def test_diagnose_overfit_on_a_large_flat_gap():
    d = diagnose(rows([0.99] * 6, [0.7, 0.8, 0.8, 0.8, 0.8, 0.8]))
    assert d.verdict == "overfit" and "gap" in d.reason


def test_diagnose_converged_when_flat_with_a_small_gap():
    d = diagnose(rows([0.7, 0.9, 0.91, 0.91, 0.91, 0.91], [0.7, 0.89, 0.89, 0.89, 0.885, 0.89]))
    assert d.verdict == "converged" and d.plateau_epoch == 2


def test_diagnose_watches_val_loss_when_there_is_no_accuracy():
    records = [
        {"epoch": e, "train/loss": 1 / (e + 1), "val/loss": v}
        for e, v in enumerate([1, 0.5, 0.5, 0.5, 0.5])
    ]
    d = diagnose(records)
    assert d.plateau_epoch == 2 and d.verdict in ("converged", "overfit")


def test_diagnose_too_few_epochs():
    assert diagnose(rows([0.5], [0.5])).verdict == "improving"
    assert diagnose([]).verdict == "improving"
