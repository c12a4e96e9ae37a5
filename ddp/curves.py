"""Learning curves: per-epoch records, a two-panel plot, and a verdict on how training went.

Everything here is a pure function of records (dicts as written to metrics.jsonl), so the
same code serves the live run (Tracker.save_curves) and `ddp-report` on finished runs.
Metric names follow the trainer: train/loss, train/accuracy, val/loss, val/accuracy; the
trainer's exact per-epoch values train/epoch_loss and train/epoch_accuracy stand in for the
train ones.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

Verdict = Literal["underfit", "overfit", "converged", "improving"]
PANELS = ("loss", "accuracy")
# Exact per-epoch train metrics (reduced over all ranks) beat an average of logged steps.
EPOCH_ALIASES = {"train/epoch_loss": "train/loss", "train/epoch_accuracy": "train/accuracy"}


def matplotlib_figure():
    """matplotlib's Figure and MaxNLocator, imported on first use: only the main rank
    draws, at the end. No pyplot: no backend, no global figure registry, no display
    (cluster nodes have none), and a smaller import."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    return Figure, MaxNLocator


def epoch_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per validated epoch: val/* and batch/* (the noise scale) from the val record,
    train/* averaged over the epoch.

    Train metrics of the epoch's steps are averaged; a train/* key in the val record (an exact
    epoch value from the trainer, train/epoch_loss counting as train/loss) wins over that average.
    """
    train_sums: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        if rec.get("kind") == "train" and rec.get("epoch") is not None:
            for key, value in _metrics(rec, "train/").items():
                train_sums[int(rec["epoch"])][key].append(value)
    by_epoch: dict[int, dict[str, Any]] = {}
    for rec in records:
        if rec.get("kind") != "val":
            continue
        epoch = int(rec["epoch"])
        means = {k: sum(v) / len(v) for k, v in train_sums.get(epoch, {}).items()}
        row = {"epoch": epoch, "step": rec.get("step"), **means}
        exact = _metrics(rec, "train/")
        row.update(exact)
        row.update({EPOCH_ALIASES[k]: v for k, v in exact.items() if k in EPOCH_ALIASES})
        row.update(_metrics(rec, "val/"))
        row.update(_metrics(rec, "batch/"))
        by_epoch[epoch] = row  # a re-run epoch (after a resume) replaces the earlier one
    return [by_epoch[e] for e in sorted(by_epoch)]


def _metrics(rec: dict[str, Any], prefix: str) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in rec.items()
        if k.startswith(prefix) and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def plot_learning_curves(
    records: list[dict[str, Any]],
    out_path: str | Path,
    best_epoch: int | None = None,
    plateau_epochs: tuple[int, int] | None = None,
    title: str | None = None,
) -> Path:
    """Train and validation loss and accuracy per epoch, best epoch and plateau marked."""
    Figure, MaxNLocator = matplotlib_figure()
    rows = epoch_records(records) if any("kind" in r for r in records) else records
    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, panel in zip(axes, PANELS, strict=True):
        for split, style in (("train", "-"), ("val", "-o")):
            xs, ys = _series(rows, f"{split}/{panel}")
            if xs:
                ax.plot(xs, ys, style, markersize=3, label=split)
        if plateau_epochs is not None:
            # Half an epoch either side, so a one-epoch plateau still shows.
            first, last = plateau_epochs[0] - 0.5, plateau_epochs[1] + 0.5
            ax.axvspan(first, last, color="orange", alpha=0.2, label="plateau")
        if best_epoch is not None:
            ax.axvline(
                best_epoch, color="green", linestyle="--", label=f"best (epoch {best_epoch})"
            )
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(panel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    return out_path


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["epoch"], r[key]) for r in rows if key in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


@dataclass(frozen=True)
class Diagnosis:
    verdict: Verdict
    plateau_epoch: int | None
    """First epoch after the best validation value, when the curve has flattened."""
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def diagnose(
    records: list[dict[str, Any]],
    window: int = 3,
    tolerance: float = 0.01,
    poor_accuracy: float = 0.6,
    max_gap: float = 0.05,
) -> Diagnosis:
    """Say whether a run underfits, overfits, has converged, or is still improving.

    The validation curve (val/accuracy, else val/loss) has plateaued when its best epoch lies
    `window` or more epochs before the end. Then: validation worse than its best by more than
    `tolerance` while training kept improving → overfit; training accuracy below
    `poor_accuracy` → underfit; a train/val gap above `max_gap` → overfit; else converged.
    Without a plateau: poor training → underfit (train longer or a bigger model), else improving.
    `tolerance` and `max_gap` are absolute for accuracy and relative for loss.
    """
    rows = epoch_records(records) if any("kind" in r for r in records) else records
    metric, higher_better = _watched(rows)
    if metric is None or len(rows) < 2:
        return Diagnosis("improving", None, "too few validated epochs to judge")
    values = [r[metric] for r in rows if finite(r.get(metric))]
    epochs = [r["epoch"] for r in rows if finite(r.get(metric))]
    if not values:
        return Diagnosis("underfit", None, f"{metric} was never finite (diverged?)")
    best_i = (max if higher_better else min)(range(len(values)), key=values.__getitem__)
    plateaued = len(values) - 1 - best_i >= window
    plateau_epoch = epochs[best_i] + 1 if plateaued else None
    train_poor = _train_poor(rows, poor_accuracy)
    if not plateaued:
        if train_poor:
            return Diagnosis("underfit", None, f"training still poor and improving: {train_poor}")
        return Diagnosis("improving", None, f"{metric} still improving (best at last epochs)")
    if _worsening(rows, metric, higher_better, best_i, tolerance) and _train_improved(
        rows, best_i, tolerance
    ):
        return Diagnosis(
            "overfit",
            plateau_epoch,
            f"{metric} worse than its best (epoch {epochs[best_i]}) while training kept improving",
        )
    if train_poor:
        return Diagnosis("underfit", plateau_epoch, f"plateau with poor training: {train_poor}")
    gap = _gap(rows[-1])
    if gap is not None and gap > max_gap:
        return Diagnosis("overfit", plateau_epoch, f"train/val gap {gap:.3g} exceeds {max_gap:g}")
    return Diagnosis("converged", plateau_epoch, f"{metric} flat since epoch {epochs[best_i]}")


def finite(value: Any) -> bool:
    """A real number that is not NaN or infinite (metrics.jsonl stores those as null)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def best_of(
    records: list[dict[str, Any]], monitor: str, mode: str
) -> tuple[float | None, int | None]:
    """The best finite `monitor` value among the validation records, and its epoch."""
    values = [
        (r[monitor], r["epoch"])
        for r in records
        if r.get("kind") == "val" and finite(r.get(monitor))
    ]
    if not values:
        return None, None
    return (max if mode == "max" else min)(values, key=lambda v: v[0])


def plateau_span(records: list[dict[str, Any]]) -> tuple[int, int] | None:
    """(first flat epoch, epoch of the decision) of the last plateau event."""
    events = [r for r in records if r.get("kind") == "event"]
    if not events or events[-1].get("plateau_start_epoch") is None:
        return None
    return events[-1]["plateau_start_epoch"], events[-1]["epoch"]


def _watched(rows: list[dict[str, Any]]) -> tuple[str | None, bool]:
    for metric, higher_better in (("val/accuracy", True), ("val/loss", False)):
        if any(metric in r for r in rows):
            return metric, higher_better
    return None, True


def _relative(now: float, then: float) -> float:
    return (now - then) / max(abs(then), 1e-12)


def _worsening(rows, metric: str, higher_better: bool, best_i: int, tol: float) -> bool:
    """Validation ended clearly worse than its best (loss judged relatively)."""
    best, last = rows[best_i][metric], rows[-1][metric]
    drop = best - last if higher_better else _relative(last, best)
    return drop > tol


def _train_improved(rows, best_i: int, tol: float) -> bool:
    for key, higher_better in (("train/loss", False), ("train/accuracy", True)):
        if key in rows[best_i] and key in rows[-1]:
            then, now = rows[best_i][key], rows[-1][key]
            return (now - then > tol) if higher_better else (_relative(now, then) < -tol)
    return False


def _train_poor(rows, poor_accuracy: float) -> str:
    """A reason string when the final training accuracy is below the bar, else ""."""
    last = rows[-1].get("train/accuracy")
    if finite(last) and last < poor_accuracy:
        return f"train/accuracy {last:.3g} < {poor_accuracy:g}"
    return ""


def _gap(row: dict[str, Any]) -> float | None:
    if finite(row.get("train/accuracy")) and finite(row.get("val/accuracy")):
        return row["train/accuracy"] - row["val/accuracy"]
    if finite(row.get("train/loss")) and finite(row.get("val/loss")):
        return _relative(row["val/loss"], row["train/loss"])
    return None


# --------------------------------------------------------------------------- helper


def plot_in_helper(
    records: list[dict[str, Any]], out_path: Path, timeout_s: float = 60.0, **options: Any
) -> Path:
    """`plot_learning_curves(records, out_path, **options)` in a short-lived helper
    process (`python -m ddp.curves`), so the trainer never imports matplotlib: rank 0's
    peak RSS stays 31 MiB lower (bench/overhead.py), for the same wall time. Falls back
    to plotting in this process if the helper cannot do it."""
    request = json.dumps({"records": records, "out_path": str(out_path), **options}, default=str)
    try:
        helper = subprocess.run(
            [sys.executable, "-m", "ddp.curves"],
            input=request,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if helper.returncode == 0 and json.loads(helper.stdout or "{}").get("ok"):
            return Path(out_path)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        pass
    return plot_learning_curves(records, out_path, **options)


def _serve() -> int:
    """The helper of `plot_in_helper`: one request on stdin, {"ok": true} on stdout."""
    request = json.loads(sys.stdin.read())
    plateau = request.get("plateau_epochs")
    plot_learning_curves(
        request["records"],
        request["out_path"],
        best_epoch=request.get("best_epoch"),
        plateau_epochs=tuple(plateau) if plateau else None,
        title=request.get("title"),
    )
    print(json.dumps({"ok": True}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_serve())
