"""The sink that sends a run's records to W&B (rank 0 only; offline unless told otherwise).

Train metrics go against the global step (`trainer/global_step`), validation and
plateau markers against the epoch, the summary to the run summary, plateau events
also as W&B alerts. W&B's start (import, service process, handshake: about 0.8 s)
runs on a thread from the constructor, alongside the rest of the job's set-up; the
first use waits for it and raises its failure, if any. On the console W&B keeps quiet
(`logger.wandb.console_summary: false`): one line at its start says where the run is.
"""

from __future__ import annotations

import os
import secrets
import string
import threading
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ddp.config import WandbConfig

STEP_METRIC = "trainer/global_step"
EPOCH_METRIC = "epoch"
_EPOCH_PREFIXES = ("val", "plateau")


def new_run_id() -> str:
    """Eight base-36 characters, like W&B's own ids (`secrets`: the seeded `random`
    module, whose state checkpoints carry, is left alone)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class WandbSink:
    def __init__(
        self,
        config: WandbConfig,
        run_dir: Path,
        run_id: str,
        resuming: bool,
        init_config: dict[str, Any],
        monitor: str,
        monitor_mode: str,
    ) -> None:
        self.run_id = run_id
        self._run = None
        self._console_summary = config.console_summary
        self._defined_prefixes = {"train", *_EPOCH_PREFIXES}
        self._starting: Future | None = _in_background(
            self._init, config, Path(run_dir), resuming, init_config, monitor, monitor_mode
        )

    def __str__(self) -> str:
        return "the W&B run"

    @property
    def run(self):
        if self._starting is not None:
            starting, self._starting = self._starting, None
            self._run = starting.result()
            self._say_where()
        return self._run

    def _say_where(self) -> None:
        """The one line that stands for W&B's own start and end-of-run output (silenced
        by `console_summary: false`): where the run is and how to sync it. Printed once W&B
        has started, before training, so the trainer's `done` line stays the last one."""
        from wandb import env

        if self._console_summary or env.is_silent():  # W&B speaks, or the user silenced it
            return
        run = self._run
        if run.offline:
            where = _shown(run.sync_dir)
            print(f"wandb: offline run in {where}; sync with: wandb sync {where}", flush=True)
        else:
            print(f"wandb: run {run.name} at {run.url}", flush=True)

    def _init(self, cfg: WandbConfig, run_dir, resuming, init_config, monitor, monitor_mode):
        mode = cfg.resolved_mode()
        import wandb  # deferred: ranks > 0 and wandb-less runs never pay for the import

        wandb_dir = Path(cfg.dir) if cfg.dir else run_dir
        wandb_dir.mkdir(parents=True, exist_ok=True)
        init_args = dict(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name,
            group=cfg.group,
            job_type=cfg.job_type,
            tags=list(cfg.tags),
            dir=str(wandb_dir),
            id=self.run_id,
            resume="allow" if resuming else None,
            config=init_config,
            settings=_settings(wandb, cfg),
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
        for prefix in _EPOCH_PREFIXES:
            run.define_metric(f"{prefix}/*", step_metric=EPOCH_METRIC)
        run.define_metric(monitor, step_metric=EPOCH_METRIC, summary=monitor_mode)
        return run

    def log(self, record: dict[str, Any]) -> None:
        kind = record["kind"]
        if kind == "train":
            metrics = {k: v for k, v in record.items() if k not in ("kind", "step", "epoch")}
            self.run.log({**metrics, STEP_METRIC: record["step"]})
        elif kind == "val":
            metrics = {k: v for k, v in record.items() if k not in ("kind", "step", "epoch")}
            self._define_epoch_axis(metrics)
            self.run.log({**metrics, EPOCH_METRIC: record["epoch"], STEP_METRIC: record["step"]})
        elif kind == "event":
            self._event(record)
        elif kind == "summary":
            self.run.summary.update({k: v for k, v in record.items() if k not in ("kind", "step")})
        # the plan went in with wandb.init's config

    def _define_epoch_axis(self, metrics: dict[str, Any]) -> None:
        # Per-epoch extras (e.g. audit/*) would otherwise be plotted against W&B's own _step.
        for prefix in {k.split("/", 1)[0] for k in metrics if "/" in k}:
            if prefix not in self._defined_prefixes:
                self.run.define_metric(f"{prefix}/*", step_metric=EPOCH_METRIC)
                self._defined_prefixes.add(prefix)

    def _event(self, record: dict[str, Any]) -> None:
        kind, epoch = record["event"], record["epoch"]
        self.run.log(
            {
                f"plateau/{kind}": 1,
                "plateau/lr_scale": record["lr_scale"],
                "plateau/reductions": record["reductions"],
                EPOCH_METRIC: epoch,
            }
        )
        if record.get("alert_level"):
            self._alert(f"{kind} at epoch {epoch}", record["reason"], record["alert_level"])

    def _alert(self, title: str, text: str, level: str) -> None:
        import wandb

        try:
            self.run.alert(title=title, text=text, level=wandb.AlertLevel(level))
        except Exception as exc:  # an alert must never take the training run down
            warnings.warn(f"W&B alert failed: {exc}", stacklevel=2)

    def image(self, key: str, path: Path) -> None:
        import wandb

        self.run.log({key: wandb.Image(str(path))})

    def finish(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)


def _settings(wandb, cfg: WandbConfig):
    """The run's wandb.Settings."""
    # System metrics make wandb-core sample the machine in the background: on a
    # CPU-bound node that steals cycles from training (about a third of the steps/s
    # of a small 2-process CPU job), so they are opt-in.
    settings = {"x_disable_stats": not cfg.system_metrics}
    if not cfg.console_summary:
        # `silent` in this run's settings silences the run's own printer (its header and
        # notes at start, the "Finishing up" progress, the end-of-run block), not wandb's
        # warnings and errors (wandb.termwarn/termerror: the global settings decide those)
        # nor wandb-core's messages (e.g. a failing upload); the run still captures the
        # console (output.log). `quiet` would still print three lines at the start of an
        # offline run and three at the end of an online one.
        settings["silent"] = True
    return wandb.Settings(**settings)


def _shown(path: str) -> str:
    """`path` relative to the working directory when it lies below it (shorter to read
    and to paste into `wandb sync`), else as it is."""
    relative = os.path.relpath(path)
    return path if relative.split(os.sep, 1)[0] == os.pardir else relative


def _in_background(fn, *args) -> Future:
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # raised where the result is used
            future.set_exception(exc)

    threading.Thread(target=run, name="ddp-wandb-start", daemon=True).start()
    return future
