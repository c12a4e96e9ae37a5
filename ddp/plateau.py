"""Plateau detection on one validation metric: stop, reduce the learning rate, or report.

Pure Python, like Lightning's EarlyStopping: no process group in here. The trainer reduces
the monitored value across ranks first, so every rank feeds the same numbers and reaches the
same decision. `state_dict()` holds plain types only, so it rides in a checkpoint loaded with
`torch.load(weights_only=True)` and patience survives a resume.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ddp.config import PlateauConfig
from ddp.errors import ConfigError

Mode = Literal["min", "max"]
Action = Literal["stop", "reduce_lr", "none"]
EventKind = Literal["plateau", "reduce_lr", "stop"]


@dataclass(frozen=True)
class PlateauEvent:
    """A decision of the tracker at one epoch; plain fields so it can be logged as is."""

    kind: EventKind
    """"plateau": reported only; "reduce_lr": multiply the LR by `factor`; "stop": end training."""
    epoch: int
    value: float
    """The monitored value at this epoch."""
    best: float | None
    best_epoch: int | None
    plateau_start_epoch: int | None
    """First epoch without improvement in this plateau."""
    reductions: int
    """LR reductions so far, this one included."""
    factor: float = 1.0
    """Multiplier to apply to the current LR now (1.0 unless kind == "reduce_lr")."""
    lr_scale: float = 1.0
    """Product of all reductions so far: LR = scheduled LR x lr_scale (floored at min_lr)."""
    reason: str = ""
    alert_level: str | None = None
    """W&B alert level for this event, None when alerts are off."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class PlateauTracker:
    """Feed one monitored value per epoch; get an event when a plateau needs action.

    An epoch without improvement is a "bad" epoch. After `patience` bad epochs in a row the
    configured action fires. Improvement means beating the best by more than min_delta; a NaN
    never improves (a diverged run must not keep patience alive).
    """

    def __init__(self, config: PlateauConfig) -> None:
        self.config = config
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0
        self.cooldown_left = 0
        self.reductions = 0
        self.stopped = False
        self.stop_reason: str | None = None
        self.plateau_start_epoch: int | None = None
        self.last_epoch: int | None = None

    @property
    def lr_scale(self) -> float:
        return self.config.factor**self.reductions

    def scaled_lr(self, lr: float) -> float:
        """The LR to use given the scheduler's LR: reductions applied, floored at min_lr."""
        return max(lr * self.lr_scale, self.config.min_lr)

    def is_improvement(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        delta = self.config.min_delta
        if self.config.min_delta_mode == "rel":
            delta *= abs(self.best)
        if self.config.mode == "max":
            return value > self.best + delta
        return value < self.best - delta

    def update(self, epoch: int, value: float) -> PlateauEvent | None:
        """Record the monitored value of `epoch`; return an event when action is needed."""
        value = float(value)
        if self.stopped or epoch < self.config.warmup_epochs:
            return None
        self.last_epoch = epoch
        if self.is_improvement(value):
            self.best, self.best_epoch = value, epoch
            self.bad_epochs, self.plateau_start_epoch = 0, None
            self._tick_cooldown()
            return None
        if self.cooldown_left > 0:
            # Right after an LR reduction the metric needs time to respond.
            self._tick_cooldown()
            return None
        self.bad_epochs += 1
        if self.plateau_start_epoch is None:
            self.plateau_start_epoch = epoch
        if self.bad_epochs < max(self.config.patience, 1):
            return None
        return self._act(epoch, value)

    def _tick_cooldown(self) -> None:
        self.cooldown_left = max(0, self.cooldown_left - 1)

    def _act(self, epoch: int, value: float) -> PlateauEvent:
        action = self.config.action
        limit = self.config.max_reductions
        if action == "stop" or (
            action == "reduce_lr" and limit is not None and self.reductions >= limit
        ):
            return self._stop(epoch, value)
        if action == "reduce_lr":
            self.reductions += 1
        event = self._event("reduce_lr" if action == "reduce_lr" else "plateau", epoch, value)
        # A new plateau must be earned again: restart the count, after the cooldown.
        self.bad_epochs, self.plateau_start_epoch = 0, None
        self.cooldown_left = self.config.cooldown
        return event

    def _stop(self, epoch: int, value: float) -> PlateauEvent:
        cfg = self.config
        best = "none" if self.best is None else f"{self.best:.6g} at epoch {self.best_epoch}"
        reason = (
            f"plateau: {cfg.monitor} did not improve by more than {cfg.min_delta:g}"
            f"{' (relative)' if cfg.min_delta_mode == 'rel' else ''} for {_epochs(self.bad_epochs)}"
            f" (best {best})"
        )
        if cfg.action == "reduce_lr":
            reason += f" after {self.reductions} LR reductions"
        self.stopped, self.stop_reason = True, reason
        return self._event("stop", epoch, value, reason)

    def _event(self, kind: EventKind, epoch: int, value: float, reason: str = "") -> PlateauEvent:
        factor = self.config.factor if kind == "reduce_lr" else 1.0
        if not reason:
            reason = f"{self.config.monitor} has not improved for {_epochs(self.bad_epochs)}"
            if kind == "reduce_lr":
                reason += f"; LR x{factor:g} (reduction {self.reductions})"
        return PlateauEvent(
            kind=kind,
            epoch=epoch,
            value=value,
            best=self.best,
            best_epoch=self.best_epoch,
            plateau_start_epoch=self.plateau_start_epoch,
            reductions=self.reductions,
            factor=factor,
            lr_scale=self.lr_scale,
            reason=reason,
            alert_level=self.config.alert_level if self.config.alert else None,
        )

    _STATE_KEYS = (
        "best",
        "best_epoch",
        "bad_epochs",
        "cooldown_left",
        "reductions",
        "stopped",
        "stop_reason",
        "plateau_start_epoch",
        "last_epoch",
    )

    def state_dict(self) -> dict[str, Any]:
        """Plain Python types only (safe for torch.load(weights_only=True))."""
        state = {key: getattr(self, key) for key in self._STATE_KEYS}
        state.update(monitor=self.config.monitor, mode=self.config.mode)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A best value of another metric (or direction) would make every decision wrong.
        for key in ("monitor", "mode"):
            if state.get(key, getattr(self.config, key)) != getattr(self.config, key):
                raise ConfigError(
                    f"plateau.{key}={getattr(self.config, key)!r} differs from the checkpoint's "
                    f"{state[key]!r}; resume with the same plateau.{key}"
                )
        for key in self._STATE_KEYS:
            setattr(self, key, state[key])


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"
