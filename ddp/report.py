"""`ddp-report DIR...`: compare finished runs (a sweep) from their metrics.jsonl files.

No network and no W&B: the metrics file of each run directory holds everything. A run
directory is any directory whose metrics.jsonl starts with a {"kind": "plan"} record.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ddp.curves import best_of, epoch_records, finite, matplotlib_figure
from ddp.sweep_fit import TradeOff, fit_trade_off, steps_to_target
from ddp.tracking.metrics_file import METRICS_FILE, read_records

SWEEP_PLOT = "sweep.png"


@dataclass(frozen=True)
class RunSummary:
    """One row of the report table."""

    name: str
    global_batch: int | None
    iterations_per_epoch: int | None
    epochs_to_plateau: int | None
    """Epochs run when the first plateau event fired (None: no plateau)."""
    best: float | None
    """The run summary's best_value (the plateau tracker's), else the best validation record."""
    best_epoch: int | None
    wall_time_s: float | None
    samples_per_s: float | None
    stop_reason: str | None
    """From the run's summary record (None: unfinished or killed)."""
    verdict: str | None
    """The diagnosis: underfit, overfit, converged or improving."""
    run_name: str | None
    """The W&B run name: experiment name and the sweep point's overrides."""
    group: str | None
    """The W&B group: the sweep directory's name for the runs of one sweep."""
    monitor: str
    path: Path
    higher_is_better: bool = True
    steps_to_target: float | None = None
    """Optimizer steps to reach the sweep's validation target (interpolated), if reached."""
    noise_scale: float | None = None
    """The noise scale B_simple measured at the epoch that reached the target (else the
    last measured)."""

    @property
    def samples_to_target(self) -> float | None:
        if self.steps_to_target is None or self.global_batch is None:
            return None
        return self.steps_to_target * self.global_batch


def find_run_dirs(roots: list[Path]) -> list[Path]:
    """Run directories under the roots (a root may itself be one), sorted by path."""
    found = set()
    for root in roots:
        candidates = [root / METRICS_FILE] if (root / METRICS_FILE).is_file() else []
        candidates += root.rglob(METRICS_FILE) if root.is_dir() else []
        found.update(p.parent for p in candidates if _starts_with_plan(p))
    return sorted(found)


def _starts_with_plan(path: Path) -> bool:
    with open(path, encoding="utf-8") as f:
        try:
            return json.loads(f.readline()).get("kind") == "plan"
        except (json.JSONDecodeError, AttributeError):
            return False


def summarize(run_dir: Path, name: str | None = None) -> RunSummary:
    records = read_records(run_dir / METRICS_FILE)
    plan = records[0]
    monitor, mode = plan.get("monitor", "val/accuracy"), plan.get("monitor_mode", "max")
    summaries = [r for r in records if r.get("kind") == "summary"]
    final = summaries[-1] if summaries else {}
    if isinstance(final.get("best_value"), (int, float)):
        # The plateau tracker's best: what checkpoints/best.pt holds and W&B's best_value shows
        # (a gain below plateau.min_delta is no improvement there).
        best, best_epoch = final["best_value"], final.get("best_epoch")
    else:  # unfinished or killed run: the best validation record so far
        best, best_epoch = best_of(records, monitor, mode)
    return RunSummary(
        higher_is_better=mode == "max",
        name=name or run_dir.name,
        global_batch=plan.get("global_size"),
        iterations_per_epoch=plan.get("iterations_per_epoch"),
        epochs_to_plateau=_epochs_to_plateau(records),
        best=best,
        best_epoch=best_epoch,
        wall_time_s=max((r.get("elapsed_s", 0.0) for r in records), default=None),
        samples_per_s=_throughput(records, plan.get("global_size")),
        stop_reason=final.get("stop_reason"),
        verdict=(final.get("diagnosis") or {}).get("verdict"),
        run_name=plan.get("run_name"),
        group=plan.get("group"),
        monitor=monitor,
        path=run_dir,
    )


def _epochs_to_plateau(records) -> int | None:
    events = [r for r in records if r.get("kind") == "event"]
    return events[0]["epoch"] + 1 if events else None  # epochs are counted from 0


def _throughput(records, global_batch: int | None) -> float | None:
    """Training samples per second: the trainer's per-epoch figure (median) when it logged one,
    else samples trained over wall time up to the last train record (validation included)."""
    per_epoch = sorted(
        r["train/samples_per_s"]
        for r in records
        if r.get("kind") == "val" and isinstance(r.get("train/samples_per_s"), (int, float))
    )
    if per_epoch:
        return per_epoch[len(per_epoch) // 2]
    train = [r for r in records if r.get("kind") == "train"]
    if not train or not global_batch or not train[-1].get("elapsed_s"):
        return None
    return train[-1]["step"] * global_batch / train[-1]["elapsed_s"]


COLUMNS = (
    ("run", "name", "{}"),
    ("global batch", "global_batch", "{:d}"),
    ("iters/epoch", "iterations_per_epoch", "{:d}"),
    ("epochs to plateau", "epochs_to_plateau", "{:d}"),
    ("best val", "best", "{:.4f}"),
    ("best epoch", "best_epoch", "{:d}"),
    ("wall time (s)", "wall_time_s", "{:.1f}"),
    ("samples/s", "samples_per_s", "{:.1f}"),
    ("steps to target", "steps_to_target", "{:.0f}"),
    ("samples to target", "samples_to_target", "{:,.0f}"),
    ("noise scale", "noise_scale", "{:,.0f}"),
    ("stop", "stop_reason", "{}"),
    ("diagnosis", "verdict", "{}"),
    ("W&B name", "run_name", "{}"),
)


@dataclass(frozen=True)
class SweepFit:
    """The sweep's common target, and the trade-off fitted to the steps each run took."""

    target: float
    monitor: str
    trade_off: TradeOff | None
    noise_scale: float | None
    """The median of the runs' measured B_simple (None: none measured)."""

    def lines(self) -> list[str]:
        said = [f"target: {self.monitor} {self.target:.4f} (the worst run's best, or --target)"]
        if self.trade_off is None:
            said.append(
                "fit (S/S_min - 1)(E/E_min - 1) = 1: none (needs 3 or more runs that reach the "
                "target, whose steps fall as the global batch grows: extend the batch sizes)"
            )
        else:
            t = self.trade_off
            said.append(
                f"fit (S/S_min - 1)(E/E_min - 1) = 1: S_min {t.min_steps:,.1f} steps, E_min "
                f"{t.min_samples:,.0f} samples, critical batch B_crit = E_min/S_min = "
                f"{t.critical_batch:,.0f}"
            )
        if self.noise_scale is not None:
            said.append(
                f"measured noise scale B_simple (median over the runs): {self.noise_scale:,.0f}"
            )
        return said


def fit_sweep(
    rows: list[RunSummary], target: float | None = None
) -> tuple[list[RunSummary], SweepFit | None]:
    """The rows with their steps to the target (default: the worst run's best) and noise
    scale, and the fit over those that reached it."""
    bests = [r.best for r in rows if isinstance(r.best, (int, float))]
    if not bests or len({r.global_batch for r in rows}) < 2:  # no sweep over the batch
        return rows, None
    higher = rows[0].higher_is_better
    if target is None:
        target = min(bests) if higher else max(bests)
    filled = []
    for row in rows:
        epochs = epoch_records(read_records(row.path / METRICS_FILE))
        steps = steps_to_target(epochs, row.monitor, target, higher)
        filled.append(
            replace(row, steps_to_target=steps, noise_scale=_noise_at(epochs, row, target))
        )
    reached = [r for r in filled if r.steps_to_target and r.global_batch]
    trade_off = fit_trade_off(
        [r.global_batch for r in reached], [r.steps_to_target for r in reached]
    )
    scales = sorted(r.noise_scale for r in filled if r.noise_scale is not None)
    median = scales[len(scales) // 2] if scales else None
    return filled, SweepFit(target, rows[0].monitor, trade_off, median)


def _noise_at(epochs: list[dict[str, Any]], row: RunSummary, target: float) -> float | None:
    """B_simple at the first epoch that reached the target, else the last measured."""
    sign = 1.0 if row.higher_is_better else -1.0
    measured = [e for e in epochs if finite(e.get("batch/noise_scale"))]
    for e in measured:
        if finite(e.get(row.monitor)) and sign * (e[row.monitor] - target) >= 0:
            return e["batch/noise_scale"]
    return measured[-1]["batch/noise_scale"] if measured else None


def format_table(rows: list[RunSummary]) -> str:
    """A plain fixed-width table, one line per run ("-" where a value is unknown)."""
    cells = [[h for h, _, _ in COLUMNS]]
    for row in rows:
        cells.append([_cell(getattr(row, attr), fmt) for _, attr, fmt in COLUMNS])
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(
            _align(cell, w, i) for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _align(cell: str, width: int, column: int) -> str:
    # Names and words read best left-aligned, numbers right-aligned.
    return cell.ljust(width) if COLUMNS[column][2] == "{}" else cell.rjust(width)


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return fmt.format(value)


def plot_sweep(rows: list[RunSummary], out_path: Path, fit: SweepFit | None = None) -> Path:
    """Validation metric vs epoch and vs global step, one line per run, labelled by batch;
    with a fit, a third panel: steps to the target against the global batch, the fitted
    trade-off, B_crit from the fit and B_simple from the runs.

    A star marks each run's best epoch: the left panel compares epochs (samples seen), the
    middle one optimizer updates, which is where a larger global batch saves time.
    """
    Figure, MaxNLocator = matplotlib_figure()
    fig = Figure(figsize=(16 if fit else 11, 4), layout="constrained")
    by_epoch, by_step, *rest = fig.subplots(1, 3 if fit else 2)
    for row in sorted(rows, key=lambda r: (r.global_batch or 0, r.name)):
        epochs = epoch_records(read_records(row.path / METRICS_FILE))
        points = [(e["epoch"], e["step"], e[row.monitor]) for e in epochs if row.monitor in e]
        if not points:
            continue
        label = f"G={row.global_batch} ({row.name})"
        for ax, x in ((by_epoch, 0), (by_step, 1)):
            (line,) = ax.plot(
                [p[x] for p in points], [p[2] for p in points], "-o", markersize=3, label=label
            )
            best = [p for p in points if p[0] == row.best_epoch]
            if best:
                ax.plot(best[0][x], best[0][2], "*", markersize=12, color=line.get_color())
    monitor = rows[0].monitor if rows else "val"
    groups = {r.group for r in rows}
    title = f"{groups.pop()}: " if len(groups) == 1 and None not in groups else ""
    fig.suptitle(f"{title}{monitor} by global batch (star: best epoch)")
    by_epoch.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax, xlabel in ((by_epoch, "epoch"), (by_step, "global step")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(monitor)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    if fit is not None:
        _plot_trade_off(rest[0], rows, fit)
    fig.savefig(out_path, dpi=100)
    return out_path


def _plot_trade_off(ax, rows: list[RunSummary], fit: SweepFit) -> None:
    reached = sorted((r.global_batch, r.steps_to_target) for r in rows if r.steps_to_target)
    ax.loglog([b for b, _ in reached], [s for _, s in reached], "o", label="runs")
    if fit.trade_off is not None and reached:
        lo, hi = reached[0][0] / 2, reached[-1][0] * 2
        grid = [lo * (hi / lo) ** (i / 50) for i in range(51)]
        ax.loglog(grid, [fit.trade_off.steps(b) for b in grid], "-", label="fit S_min(1+B_crit/B)")
        ax.axvline(
            fit.trade_off.critical_batch,
            linestyle="--",
            color="C2",
            label=(f"B_crit (fit) {fit.trade_off.critical_batch:,.0f}"),
        )
    if fit.noise_scale is not None:
        ax.axvline(
            fit.noise_scale,
            linestyle=":",
            color="C3",
            label=(f"B_simple (measured) {fit.noise_scale:,.0f}"),
        )
    ax.set_xlabel("global batch")
    ax.set_ylabel(f"steps to {fit.monitor} {fit.target:.3f}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")


def _display_name(run_dir: Path, roots: list[Path]) -> str:
    for root in roots:
        if run_dir != root and root in run_dir.parents:
            return str(run_dir.relative_to(root))
    return run_dir.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ddp-report", description="Compare runs of a sweep from their metrics.jsonl files."
    )
    parser.add_argument("dirs", nargs="+", type=Path, help="a sweep (multirun) dir or run dirs")
    parser.add_argument("--out", type=Path, help=f"comparison plot (default DIR/{SWEEP_PLOT})")
    parser.add_argument(
        "--target",
        type=float,
        help="validation target for steps to target (default: the worst run's best)",
    )
    args = parser.parse_args(argv)
    missing = [d for d in args.dirs if not d.exists()]
    if missing:
        print(f"ddp-report: no such directory: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    run_dirs = find_run_dirs(args.dirs)
    if not run_dirs:
        print(
            f"ddp-report: no {METRICS_FILE} with a plan record under the given dirs",
            file=sys.stderr,
        )
        return 1
    rows = [summarize(d, _display_name(d, args.dirs)) for d in run_dirs]
    rows, fit = fit_sweep(rows, args.target)
    print(format_table(rows))
    if fit is not None:
        print("\n" + "\n".join(fit.lines()))
    out = args.out or args.dirs[0] / SWEEP_PLOT
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"\nplot: {plot_sweep(rows, out, fit)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
