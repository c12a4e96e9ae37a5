"""The run's checkpoints: what a checkpoint holds of the run state, and when it is written.

`Checkpointer` writes checkpoints/last.pt (and best.pt, a byte copy) from rank 0 on a
background thread while training goes on (ddp.checkpoint: the file format and atomic
writes); every rank takes part in gathering the RNG states and the sample audit.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from ddp import checkpoint
from ddp.config import CheckpointConfig
from ddp.distributed import collectives
from ddp.distributed.group import DistEnv
from ddp.errors import CheckpointError
from ddp.plan import BatchPlan
from ddp.state import Position, Training, class_name


class EpochCounter(Protocol):
    """Sums over the unfinished epoch that a checkpoint carries (ddp.audit.SampleAudit,
    ddp.noise_meter.NoiseMeter): `state` is collective, `resume` restores on rank 0."""

    def state(self, env: DistEnv) -> Any: ...

    def resume(self, state: dict[str, Any] | None, env: DistEnv) -> None: ...


class Checkpointer:
    """checkpoints/last.pt (and best.pt, a byte copy), written by rank 0 while training
    goes on; every rank takes part in gathering the RNG states."""

    def __init__(
        self,
        directory: Path,
        every: CheckpointConfig,
        config_record: dict[str, Any],
        plan: BatchPlan,
        data: dict[str, Any],
        training: Training,
        env: DistEnv,
        wandb_run_id: str | None,
        counters: dict[str, EpochCounter | None] | None = None,
    ) -> None:
        self.directory = directory
        self.counters = counters or {}
        """Per-epoch sums a mid-epoch resume continues (the sample audit, the noise scale's
        norms), saved under their names."""
        self.every = every
        self.config_record, self.plan, self.data = config_record, plan, data
        self.training, self.env = training, env
        self.wandb_run_id = wandb_run_id
        self.writer = checkpoint.BackgroundWriter()
        self._last_save = time.monotonic()
        self._failure: str | None = None

    def due(self, next_step: int) -> bool:
        """By steps or by minutes (trainer.checkpoint); the caller shares the answer so all
        ranks save together."""
        every, minutes = self.every.every_steps, self.every.every_minutes
        by_steps = every is not None and next_step % every == 0
        by_time = minutes is not None and time.monotonic() - self._last_save >= 60 * minutes
        return by_steps or by_time

    def state(self, pos: Position) -> dict[str, Any]:
        training = self.training
        gathered = collectives.all_gather_bytes(checkpoint.rng_state_bytes(), self.env)
        return {
            "format": checkpoint.FORMAT,
            "model": training.model.state_dict(),
            "optimizer": training.optimizer.state_dict(),
            "optimizer_class": class_name(training.optimizer),
            "scaler": training.scaler.state_dict(),
            "position": asdict(pos),
            "plateau": training.plateau.state_dict(),
            "rng": [checkpoint.rng_state_from_bytes(b) for b in gathered],  # every rank's
            "plan": self.plan.as_dict(),
            "data": self.data,  # what a resume must find again (ddp.data.identity)
            "config": self.config_record,
            "wandb_run_id": self.wandb_run_id,
            **{name: c.state(self.env) if c else None for name, c in self.counters.items()},
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

    @property
    def failure(self) -> str | None:
        """Why the last write failed (rank 0), e.g. a full disk; None while all is well."""
        return self._failure or self.writer.failure

    def close(self) -> None:
        """The last checkpoint is on disk (or its failure known) before anyone reports or
        leaves (or is killed by torchrun while rank 0 writes)."""
        try:
            self.writer.wait()
        except CheckpointError as exc:
            self._failure = str(exc)
        collectives.barrier(self.env)
