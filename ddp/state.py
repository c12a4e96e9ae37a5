"""Run state: where the run is, who asked it to stop, who owns its directory, and the
objects a step updates.

- `Position`: epoch, step and the sums of the unfinished epoch: what a resume restores.
- `StopRequest`: SIGTERM / SIGUSR1 (preemption) set a flag that the loop agrees on.
- `claim_run_dir`: one job per run directory, refused on every rank together.
- `Training`: model, optimizer, scaler and plateau tracker, restored from a checkpoint.
(ddp.checkpointer writes the checkpoints; ddp.resume decides what a start continues.)
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ddp import checkpoint
from ddp.distributed import collectives
from ddp.distributed.group import DistEnv
from ddp.errors import ConfigError
from ddp.plateau import PlateauTracker
from ddp.run_dir import RunLock

EPOCH_SUMS = ("loss", "correct", "count", "skipped")
"""Per-step totals (over all ranks) that add up to the epoch's train metrics."""


@dataclass
class Position:
    """Where the run is: what a checkpoint must restore to continue exactly."""

    epoch: int = 0
    step_in_epoch: int = 0
    """Optimizer updates already done in `epoch`."""
    global_step: int = 0
    skipped_steps: int = 0
    micro_batches: int = 0
    """Micro-batches this rank has run: equal on all ranks, or DDP would have hung."""
    epoch_sums: dict[str, float] = field(default_factory=dict)
    """Train loss/accuracy sums of the unfinished epoch over all ranks (the same on every
    rank, so a mid-epoch resume from rank 0's checkpoint reports exactly)."""

    def advance(self, step: int, micro_batches: int, sums: dict[str, float], updated: bool) -> None:
        """Step `step` of the epoch is done: its sums added, and counted as skipped when its
        update was not applied (a non-finite loss)."""
        self.global_step += 1
        self.step_in_epoch = step + 1
        self.micro_batches += micro_batches
        self.skipped_steps += not updated
        for key, value in sums.items():
            self.epoch_sums[key] = self.epoch_sums.get(key, 0.0) + value

    def next_epoch(self) -> None:
        self.epoch, self.step_in_epoch, self.epoch_sums = self.epoch + 1, 0, {}

    def epochs(self, max_epochs: int | None) -> Iterable[int]:
        """This epoch, the next, ... up to max_epochs (without end when the plateau decides)."""
        return itertools.count(self.epoch) if max_epochs is None else range(self.epoch, max_epochs)


class StopRequest:
    """Signals that ask the run to stop at the next step boundary, after a checkpoint.

    SIGTERM and SIGUSR1 (SLURM preemption, torchrun's shutdown) mean "preempted: run again
    to continue" (exit 75); SIGINT (Ctrl-C) means "interrupted" (exit 130), and a second
    Ctrl-C stops the process at once. The loop agrees on the flags across ranks.
    """

    def __init__(self) -> None:
        self.preempt = False
        self.interrupt = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._preempted)
        signal.signal(signal.SIGINT, self._interrupted)

    def _preempted(self, signum: int, frame: Any) -> None:
        self.preempt = True

    def _interrupted(self, signum: int, frame: Any) -> None:
        if self.interrupt:  # the second Ctrl-C: no more waiting
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.raise_signal(signal.SIGINT)
        self.interrupt = True
        print("interrupted: stopping after this step (Ctrl-C again to stop now)", flush=True)


def claim_run_dir(run_dir: Path, env: DistEnv) -> RunLock | None:
    """Rank 0 takes the run directory's lock for the job; every rank refuses together
    (one line, from rank 0) when another job holds it."""
    lock, refusal = None, None
    if env.is_main:
        try:
            lock = RunLock.acquire(run_dir)
        except ConfigError as exc:
            refusal = str(exc)
    refusal = collectives.broadcast_object(refusal, env)
    if refusal is not None:
        raise Refusal(refusal, shown=env.is_main)
    return lock


class Refusal(ConfigError):
    """Bad input that all ranks agreed on: only the rank that saw it prints it."""

    def __init__(self, message: str, shown: bool) -> None:
        super().__init__(message)
        self.shown = shown


@dataclass
class Training:
    """The objects a step updates and a checkpoint holds."""

    model: torch.nn.Module
    """The user's module (evaluation, checkpoints)."""
    ddp_model: torch.nn.Module
    """Its DDP wrapper (training); the module itself on one process."""
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    plateau: PlateauTracker

    def restore(self, state: dict[str, Any], rank: int, world_size: int) -> Position:
        """Continue from `state`; ConfigError naming the checkpoint when it belongs to
        another model, optimizer or plateau metric (checked before anything is written)."""
        path = state.get("path", "the checkpoint")
        saved_optimizer = state.get("optimizer_class")  # absent from older checkpoints
        if saved_optimizer is not None and saved_optimizer != class_name(self.optimizer):
            raise ConfigError(
                f"cannot resume {path}: it was trained with optimizer {saved_optimizer}, "
                f"now {class_name(self.optimizer)} (keep optim, or use a new run.name)"
            )
        try:
            self.model.load_state_dict(state["model"])
            if saved_optimizer is None:
                _check_param_groups(self.optimizer, state["optimizer"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            self.plateau.load_state_dict(state["plateau"])
        except (RuntimeError, ValueError, KeyError) as exc:
            reason = " ".join(str(exc).split())  # torch lists mismatches over many lines
            raise ConfigError(f"cannot resume {path}: {_shorten(reason)}") from exc
        rngs = state["rng"]
        if len(rngs) == world_size:  # elastic resume: same data order, fresh dropout streams
            checkpoint.set_rng_state(rngs[rank])
        return Position(**state["position"])


def class_name(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _check_param_groups(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """torch would take another optimizer's hyper-parameters silently (and fail at the
    first step): the saved groups must have this optimizer's keys."""
    for group, old in zip(optimizer.param_groups, saved["param_groups"], strict=False):
        missing = sorted(set(group) - set(old) - {"params"})
        if missing:
            raise ValueError(
                f"the optimizer state lacks {', '.join(missing)}: it belongs to another optimizer"
            )


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
