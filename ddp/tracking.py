"""Rank-0 side effects of a run: W&B, metrics.jsonl, learning curves, alerts.

Every rank builds a Tracker with `enabled=env.is_main`; on the other ranks every method does
nothing, so the training loop never branches on the rank. metrics.jsonl in the run directory
holds the same numbers as W&B, one JSON object per line:

    {"kind": "plan", ...plan fields..., "config": {...}, "monitor": ..., "run_name": ...,
     "group": ..., "wandb_run_id": ...}
    {"kind": "train", "step": ..., "epoch": ..., "train/loss": ...}
    {"kind": "val", "step": ..., "epoch": ..., "val/accuracy": ...}
    {"kind": "event", "step": ..., "epoch": ..., "event": "stop", ...}
    {"kind": "summary", "step": ..., "best": ..., "best_epoch": ..., "stop_reason": ...}

Every record also carries "time" (unix seconds) and "elapsed_s" (training wall time so far,
summed over restarts, excluding the downtime between them).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
import threading
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ddp.curves import diagnose, plot_in_helper
from ddp.plateau import PlateauEvent

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "learning_curves.png"
STEP_METRIC = "trainer/global_step"
EPOCH_METRIC = "epoch"


@dataclass
class WandbConfig:
    enabled: bool = True
    mode: str = "offline"
    """offline | online | disabled."""
    """Offline by default (clusters rarely reach the internet); env WANDB_MODE wins when set."""
    project: str = "ddp"
    entity: str | None = None
    name: str | None = None
    """Run name; defaults to the run directory's name."""
    group: str | None = None
    """Runs of one sweep share a group."""
    job_type: str = "train"
    tags: list[str] = field(default_factory=list)
    dir: str | None = None
    """Where wandb writes its files; defaults to the run directory."""
    system_metrics: bool = False
    """Let W&B sample CPU/GPU/memory use in the background (costs CPU on busy nodes)."""

    def __post_init__(self) -> None:
        if self.mode not in ("offline", "online", "disabled"):
            raise ValueError(
                f"logger.wandb.mode={self.mode!r} must be one of offline, online, disabled"
            )

    def resolved_mode(self) -> str:
        mode = os.environ.get("WANDB_MODE") or self.mode
        # "dryrun" is W&B's old spelling of offline.
        return {"dryrun": "offline", "run": "online"}.get(mode, mode)


class Tracker:
    """Logging, summaries and plots of one run; a no-op unless `enabled` (rank 0)."""

    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        plan: dict[str, Any],
        wandb: WandbConfig | None = None,
        *,
        enabled: bool = True,
        resume_run_id: str | None = None,
        resume_from_step: int | None = None,
        monitor: str = "val/accuracy",
        monitor_mode: Literal["min", "max"] = "max",
    ) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.monitor, self.monitor_mode = monitor, monitor_mode
        self.records: list[dict[str, Any]] = []
        self._wandb_run = None
        self._starting: Future | None = None
        self._run_id: str | None = None
        self._file = None
        self._step = 0
        self._epoch: int | None = None
        self._finished = False
        self._defined_prefixes = {"train", "val", "plateau"}
        self.run_name = (wandb.name if wandb else None) or self.run_dir.name
        """The W&B run name; also the learning curve's title and ddp-report's label."""
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        kept = self._load_kept_records(resume_from_step or 0)
        self._elapsed_offset = max((r.get("elapsed_s", 0.0) for r in kept), default=0.0)
        self._t0 = time.monotonic()
        wandb = wandb or WandbConfig()
        if wandb.enabled and wandb.resolved_mode() != "disabled":
            self._run_id = resume_run_id or _new_run_id()
            self._starting = _in_background(
                self._init_wandb, wandb, config, plan, self._run_id, resume_run_id is not None
            )
        plan_record = {
            "kind": "plan",
            **plan,
            "config": config,
            "monitor": monitor,
            "monitor_mode": monitor_mode,
            # The W&B name and group, also without W&B: ddp-report labels runs with them.
            "run_name": self.run_name,
            "group": wandb.group,
            "wandb_run_id": self.run_id,
            **self._stamp(),
        }
        self._rewrite([plan_record, *kept])
        self._file = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115

    # ------------------------------------------------------------------ set-up

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_FILE

    @property
    def run_id(self) -> str | None:
        """The W&B run id (chosen before W&B starts: it heads metrics.jsonl)."""
        return self._run_id

    def ready(self) -> None:
        """Wait until W&B has started (raising its failure, if any), before training."""
        if self.enabled:
            self._run  # noqa: B018 - the property waits

    @property
    def _run(self):
        """The W&B run, once started. W&B's start (import, service process, handshake:
        about 0.8 s) runs on a thread from the constructor, alongside the rest of the
        job's set-up; the first use waits for it and raises its failure, if any."""
        if self._starting is not None:
            starting, self._starting = self._starting, None
            self._wandb_run = starting.result()
        return self._wandb_run

    def _load_kept_records(self, resume_step: int) -> list[dict[str, Any]]:
        """Records of an earlier attempt up to the checkpoint's step.

        Steps after the checkpoint will be trained again; keeping them would duplicate them.
        The plan line is rewritten, summaries are rewritten at the end.
        """
        if not self.metrics_path.exists():
            return []
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill mid-write
            if rec.get("kind") in ("plan", "summary"):
                continue
            if rec.get("step", 0) <= resume_step:
                kept.append(rec)
        return kept

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        # Atomic replace: a kill now leaves either the old file or the new one, never half.
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(_dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.metrics_path)
        self.records = records

    def _init_wandb(self, cfg: WandbConfig, config, plan, run_id: str, resuming: bool):
        mode = cfg.resolved_mode()
        import wandb  # deferred: ranks > 0 and wandb-less runs never pay for the import

        wandb_dir = Path(cfg.dir) if cfg.dir else self.run_dir
        wandb_dir.mkdir(parents=True, exist_ok=True)
        init_args = dict(
            project=cfg.project,
            entity=cfg.entity,
            name=self.run_name,
            group=cfg.group,
            job_type=cfg.job_type,
            tags=list(cfg.tags),
            dir=str(wandb_dir),
            id=run_id,
            resume="allow" if resuming else None,
            config={"config": config, "plan": plan},
            # System metrics make wandb-core sample the machine in the background: on a
            # CPU-bound node that steals cycles from training (about a third of the steps/s
            # of a small 2-process CPU job), so they are opt-in.
            settings=wandb.Settings(x_disable_stats=not cfg.system_metrics),
            # A resumed run brings a different config only if the user changed it on purpose.
            allow_val_change=True,
        )
        try:
            run = wandb.init(mode=mode, **init_args)
        except Exception as exc:
            if mode != "online":
                raise
            # No login or no network on this node: keep the run offline for `wandb sync`
            # rather than lose the training job to its logger.
            warnings.warn(f"W&B online start failed ({exc}); logging offline", stacklevel=2)
            run = wandb.init(mode="offline", **init_args)
        run.define_metric(STEP_METRIC)
        run.define_metric("train/*", step_metric=STEP_METRIC)
        run.define_metric(EPOCH_METRIC)
        run.define_metric("val/*", step_metric=EPOCH_METRIC)
        run.define_metric("plateau/*", step_metric=EPOCH_METRIC)
        run.define_metric(self.monitor, step_metric=EPOCH_METRIC, summary=self.monitor_mode)
        return run

    # ----------------------------------------------------------------- logging

    def _stamp(self) -> dict[str, float]:
        elapsed = self._elapsed_offset + time.monotonic() - self._t0
        return {"time": round(time.time(), 3), "elapsed_s": round(elapsed, 3)}

    def _write(self, record: dict[str, Any]) -> None:
        record = {**record, **self._stamp()}
        self.records.append(record)
        self._file.write(_dumps(record) + "\n")
        # Flushed per line: a crash loses at most the line being written.
        self._file.flush()

    def log_train(self, step: int, metrics: dict[str, float], epoch: int | None = None) -> None:
        """Train metrics against the global step (`trainer/global_step` in W&B).

        The epoch may come as an argument or as metrics["epoch"]; the file records it per line.
        """
        if not self.enabled:
            return
        self._step = step
        epoch = metrics.get("epoch", epoch)
        self._epoch = int(epoch) if epoch is not None else self._epoch
        self._write({"kind": "train", "step": step, **metrics, "epoch": self._epoch})
        if self._run is not None:
            self._run.log({**metrics, STEP_METRIC: step})

    def log_val(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        """Validation metrics against the epoch."""
        if not self.enabled:
            return
        self._step, self._epoch = step, epoch
        self._write({"kind": "val", "step": step, "epoch": epoch, **metrics})
        if self._run is not None:
            self._define_epoch_axis(metrics)
            self._run.log({**metrics, EPOCH_METRIC: epoch, STEP_METRIC: step})

    def _define_epoch_axis(self, metrics: dict[str, float]) -> None:
        # Per-epoch extras (e.g. audit/*) would otherwise be plotted against W&B's own _step.
        for prefix in {k.split("/", 1)[0] for k in metrics if "/" in k}:
            if prefix not in self._defined_prefixes:
                self._run.define_metric(f"{prefix}/*", step_metric=EPOCH_METRIC)
                self._defined_prefixes.add(prefix)

    def log_event(self, epoch: int, event: PlateauEvent) -> None:
        """A plateau marker in the history and, when configured, a W&B alert."""
        if not self.enabled:
            return
        fields = {k: v for k, v in event.as_dict().items() if k not in ("kind", "epoch")}
        self._write(
            {"kind": "event", "step": self._step, "epoch": epoch, "event": event.kind, **fields}
        )
        if self._run is None:
            return
        self._run.log(
            {
                f"plateau/{event.kind}": 1,
                "plateau/lr_scale": event.lr_scale,
                "plateau/reductions": event.reductions,
                EPOCH_METRIC: epoch,
            }
        )
        if event.alert_level:
            self._alert(f"{event.kind} at epoch {epoch}", event.reason, event.alert_level)

    def _alert(self, title: str, text: str, level: str) -> None:
        import wandb

        try:
            self._run.alert(title=title, text=text, level=wandb.AlertLevel(level))
        except Exception as exc:  # an alert must never take the training run down
            warnings.warn(f"W&B alert failed: {exc}", stacklevel=2)

    def summary(self, **values: Any) -> None:
        """Final numbers (best, best_epoch, stop_reason, ...); a diagnosis is added if absent."""
        if not self.enabled:
            return
        if "diagnosis" not in values:
            values["diagnosis"] = diagnose(self.records).as_dict()
        self._write({"kind": "summary", "step": self._step, **values})
        if self._run is not None:
            self._run.summary.update(values)

    def best_epoch(self) -> int | None:
        """Epoch of the best monitored value among the validation records."""
        vals = [
            (r[self.monitor], r["epoch"])
            for r in self.records
            if r.get("kind") == "val" and _finite(r.get(self.monitor))
        ]
        if not vals:
            return None
        pick = max if self.monitor_mode == "max" else min
        return pick(vals, key=lambda v: v[0])[1]

    def plateau_epochs(self) -> tuple[int, int] | None:
        """(first flat epoch, epoch of the decision) of the last plateau event."""
        events = [r for r in self.records if r.get("kind") == "event"]
        if not events or events[-1].get("plateau_start_epoch") is None:
            return None
        return events[-1]["plateau_start_epoch"], events[-1]["epoch"]

    def save_curves(self) -> Path | None:
        """Write the learning-curve PNG in the run directory and log it to W&B."""
        if not self.enabled:
            return None
        path = plot_in_helper(
            self.records,
            self.run_dir / CURVES_FILE,
            best_epoch=self.best_epoch(),
            plateau_epochs=self.plateau_epochs(),
            title=self.run_name,
        )
        if self._run is not None:
            import wandb

            self._run.log({"curves/learning": wandb.Image(str(path))})
        return path

    def finish(self, exit_code: int = 0) -> None:
        """Close the metrics file and the W&B run; safe to call twice."""
        if not self.enabled or self._finished:
            return
        self._finished = True
        if self._file is not None:
            self._file.close()
        if self._run is not None:
            self._run.finish(exit_code=exit_code)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


def _new_run_id() -> str:
    """Eight base-36 characters, like W&B's own ids (`secrets`: the seeded `random`
    module, whose state checkpoints carry, is left alone)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _in_background(fn, *args) -> Future:
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # raised where the result is used
            future.set_exception(exc)

    threading.Thread(target=run, name="ddp-wandb-start", daemon=True).start()
    return future


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _dumps(record: dict[str, Any]) -> str:
    # NaN/inf are not JSON; write null so any JSON reader can load the file.
    return json.dumps(_json_safe(record), default=str)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
