"""Run state: where the run is, who asked it to stop, and its checkpoints.

- `Position`: epoch, step and the sums of the unfinished epoch: what a resume restores.
- `StopRequest`: SIGTERM / SIGUSR1 (preemption) set a flag that the loop agrees on.
- `load_resume_point`: last.pt, checked against the new plan, before any process group.
- `Checkpointer`: the state a checkpoint holds, written by rank 0 in the background.
"""

from __future__ import annotations

import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ddp import checkpoint
from ddp.config import TrainerConfig
from ddp.dist import collectives
from ddp.dist.group import DistEnv
from ddp.plan import BatchPlan
from ddp.plateau import PlateauTracker
from ddp.validate import ConfigError

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


class StopRequest:
    """SIGTERM / SIGUSR1 (SLURM preemption, torchrun shutdown) set a flag; the loop agrees on it."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None


PLAN_KEYS = ("global_size", "num_samples", "drop_last")
"""What a resume must keep: the position in the epoch means nothing in another plan."""


def load_resume_point(
    ckpt_dir: Path, trainer: TrainerConfig, plan: BatchPlan
) -> dict[str, Any] | None:
    """The checkpoint to continue from (None: start fresh), checked against the new plan."""
    path = ckpt_dir / "last.pt"
    if not trainer.resume or not path.exists():
        return None
    state = checkpoint.load(path)
    saved = state["plan"]
    changed = [k for k in PLAN_KEYS if saved[k] != getattr(plan, k)]
    if changed and not trainer.restart_epoch_on_plan_change:
        key = changed[0]
        raise ConfigError(
            f"cannot resume {path}: {key} was {saved[key]}, now {getattr(plan, key)} "
            "(keep it, use a new run.name, or set trainer.restart_epoch_on_plan_change=true)"
        )
    if changed:  # the saved position means nothing in the new plan: restart the epoch
        state["position"].update(step_in_epoch=0, epoch_sums={})
    return state


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
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.plateau.load_state_dict(state["plateau"])
        rngs = state["rng"]
        if len(rngs) == world_size:  # elastic resume: same data order, fresh dropout streams
            checkpoint.set_rng_state(rngs[rank])
        return Position(**state["position"])


class Checkpointer:
    """checkpoints/last.pt (and best.pt, a byte copy), written by rank 0 while training
    goes on; every rank takes part in gathering the RNG states."""

    def __init__(
        self,
        directory: Path,
        trainer: TrainerConfig,
        config_record: dict[str, Any],
        plan: BatchPlan,
        training: Training,
        env: DistEnv,
        wandb_run_id: str | None,
    ) -> None:
        self.directory = directory
        self.trainer = trainer
        self.config_record, self.plan = config_record, plan
        self.training, self.env = training, env
        self.wandb_run_id = wandb_run_id
        self.writer = checkpoint.BackgroundWriter()
        self._last_save = time.monotonic()

    def due(self, next_step: int) -> bool:
        """By steps or by minutes; the caller shares the answer so all ranks save together."""
        t = self.trainer
        every = t.checkpoint_every_steps
        by_steps = every is not None and next_step % every == 0
        minutes = t.checkpoint_every_minutes
        by_time = minutes is not None and time.monotonic() - self._last_save >= 60 * minutes
        return by_steps or by_time

    def state(self, pos: Position) -> dict[str, Any]:
        training = self.training
        gathered = collectives.all_gather_bytes(checkpoint.rng_state_bytes(), self.env)
        return {
            "format": checkpoint.FORMAT,
            "model": training.model.state_dict(),
            "optimizer": training.optimizer.state_dict(),
            "scaler": training.scaler.state_dict(),
            "position": asdict(pos),
            "plateau": training.plateau.state_dict(),
            "rng": [checkpoint.rng_state_from_bytes(b) for b in gathered],  # every rank's
            "plan": self.plan.as_dict(),
            "config": self.config_record,
            "wandb_run_id": self.wandb_run_id,
        }

    def save(self, pos: Position, best: bool = False, leaving: bool = False) -> None:
        """last.pt (and best.pt); before leaving, every rank waits until it is on disk."""
        state = self.state(pos)
        if self.env.is_main:
            if checkpoint.has_nonfinite(state["model"]):
                print("warning: not saving last.pt: the weights are not finite", flush=True)
            else:
                copies = (self.directory / "best.pt",) if best else ()
                self.writer.save(state, self.directory / "last.pt", copies=copies)
        self._last_save = time.monotonic()
        if leaving:
            self.close()

    def close(self) -> None:
        """The last checkpoint is on disk before anyone reports or leaves (or is killed
        by torchrun while rank 0 writes)."""
        self.writer.wait()
        collectives.barrier(self.env)
