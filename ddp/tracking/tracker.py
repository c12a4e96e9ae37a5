"""The Tracker: the records of a run, fanned out to its sinks.

Every rank holds one; only rank 0's has sinks (`Tracker.start(..., main=False)` gives
one without), so the training loop logs unconditionally and never branches on the rank.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from ddp.config import WandbConfig
from ddp.curves import best_of, diagnose, plateau_span, plot_in_helper
from ddp.plateau import PlateauEvent
from ddp.tracking.metrics_file import MetricsFile, Record
from ddp.tracking.wandb_sink import WandbSink, new_run_id

CURVES_FILE = "learning_curves.png"


class Sink(Protocol):
    def log(self, record: Record) -> None: ...

    def finish(self, exit_code: int) -> None: ...


class Tracker:
    def __init__(
        self,
        run_dir: Path,
        sinks: list[Sink],
        metrics: MetricsFile | None,
        wandb: WandbSink | None,
        run_id: str | None,
        run_name: str,
        monitor: str,
        monitor_mode: str,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.sinks = sinks
        self._metrics, self._wandb = metrics, wandb
        self.run_id = run_id
        """The W&B run id (chosen before W&B starts: it heads metrics.jsonl and checkpoints)."""
        self.run_name = run_name
        """The W&B run name; also the learning curve's title and ddp-report's label."""
        self.monitor, self.monitor_mode = monitor, monitor_mode
        self._step, self._epoch = 0, None
        self._finished = False
        self._plan: Record | None = None
        """The plan record, written by `ready`."""
        self.failure: str | None = None
        """Why a sink could not write (e.g. a full disk); that sink is dropped."""

    @classmethod
    def start(
        cls,
        run_dir: Path,
        config: dict[str, Any],
        plan: dict[str, Any],
        wandb: WandbConfig,
        *,
        main: bool = True,
        resume_run_id: str | None = None,
        resume_from_step: int | None = None,
        monitor: str = "val/accuracy",
        monitor_mode: str = "max",
    ) -> Tracker:
        """The run's tracker, W&B starting on the main rank; nothing is written before `ready`."""
        run_name = wandb.name or Path(run_dir).name
        if not main:
            return cls(run_dir, [], None, None, None, run_name, monitor, monitor_mode)
        run_id = (resume_run_id or new_run_id()) if wandb.active else None
        metrics = MetricsFile(run_dir, resume_from_step)
        sinks: list[Sink] = [metrics]
        sink = None
        if wandb.active:
            sink = WandbSink(
                replace(wandb, name=run_name),
                run_dir,
                run_id,
                resuming=resume_run_id is not None,
                init_config={"config": config, "plan": plan},
                monitor=monitor,
                monitor_mode=monitor_mode,
            )
            sinks.append(sink)
        tracker = cls(run_dir, sinks, metrics, sink, run_id, run_name, monitor, monitor_mode)
        tracker._plan = {
            "kind": "plan",
            **plan,
            "config": config,
            "monitor": monitor,
            "monitor_mode": monitor_mode,
            # The W&B name and group, also without W&B: ddp-report labels runs with them.
            "run_name": run_name,
            "group": wandb.group,
            "wandb_run_id": run_id,
        }
        return tracker

    @property
    def records(self) -> list[Record]:
        """Every record of the run so far (none on ranks > 0)."""
        return self._metrics.records if self._metrics is not None else []

    def ready(self) -> None:
        """Wait until W&B has started (raising its failure, if any), then write the plan
        record: the tracker's first write to the run (a resumed run's metrics.jsonl is cut
        back to its checkpoint here)."""
        if self._wandb is not None:
            self._wandb.run  # noqa: B018 - the property waits
        self._write_plan()

    def _write_plan(self) -> None:
        if self._plan is not None:
            plan, self._plan = self._plan, None
            self._log(plan)

    def log(self, record: Record) -> None:
        self._write_plan()  # the plan heads the records, even where `ready` was not called
        self._log(record)

    def _log(self, record: Record) -> None:
        for sink in list(self.sinks):
            try:
                sink.log(record)
            except OSError as exc:  # the loop agrees to stop on it at the next step
                self.failure = (
                    self.failure or f"cannot write {exc.filename or sink}: {exc.strerror}"
                )
                self.sinks.remove(sink)

    def log_train(self, step: int, metrics: dict[str, float], epoch: int | None = None) -> None:
        """Train metrics against the global step; the epoch may also come as metrics["epoch"]."""
        self._step = step
        epoch = metrics.get("epoch", epoch)
        self._epoch = int(epoch) if epoch is not None else self._epoch
        values = {k: v for k, v in metrics.items() if k != "epoch"}
        self.log({"kind": "train", "step": step, **values, "epoch": self._epoch})

    def log_val(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        """Validation (and other per-epoch) metrics against the epoch."""
        self._step, self._epoch = step, epoch
        self.log({"kind": "val", "step": step, "epoch": epoch, **metrics})

    def log_event(self, epoch: int, event: PlateauEvent) -> None:
        """A plateau marker in the history and, when configured, a W&B alert."""
        fields = {k: v for k, v in event.as_dict().items() if k not in ("kind", "epoch")}
        self.log(
            {"kind": "event", "step": self._step, "epoch": epoch, "event": event.kind, **fields}
        )

    def summary(self, **values: Any) -> None:
        """Final numbers (best, best_epoch, stop_reason, ...); a diagnosis is added if absent."""
        values.setdefault("diagnosis", diagnose(self.records).as_dict())
        self.log({"kind": "summary", "step": self._step, **values})

    def best_epoch(self) -> int | None:
        """Epoch of the best monitored value among the validation records."""
        return best_of(self.records, self.monitor, self.monitor_mode)[1]

    def save_curves(self) -> Path | None:
        """Write the learning-curve PNG in the run directory and log it to W&B."""
        if not self.sinks:
            return None
        path = plot_in_helper(
            self.records,
            self.run_dir / CURVES_FILE,
            best_epoch=self.best_epoch(),
            plateau_epochs=plateau_span(self.records),
            title=self.run_name,
        )
        if self._wandb is not None:
            self._wandb.image("curves/learning", path)
        return path

    def finish(self, exit_code: int = 0) -> None:
        """Close the metrics file and the W&B run; safe to call twice."""
        if self._finished:
            return
        self._finished = True
        for sink in self.sinks:
            sink.finish(exit_code)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)
