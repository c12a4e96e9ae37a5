"""What a start continues from: the run directory's last checkpoint, checked against
the new plan, the order, the data and `trainer.resume` before anything is written, or
the word that the run is already finished.

Reads only: a refusal (ConfigError naming the checkpoint and what changed) leaves every
file of the run as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ddp import checkpoint
from ddp.config import TrainerConfig
from ddp.config_moves import upgrade_record
from ddp.data.identity import what_changed
from ddp.errors import ConfigError
from ddp.plan import BatchPlan
from ddp.tracking.metrics_file import METRICS_FILE

PLAN_KEYS = ("global_size", "num_samples", "drop_last")
"""What a resume must keep: the position in the epoch means nothing in another plan."""

ORDER_KEYS = {"trainer.seed": 0, "data.window_shards": None}
"""Config keys that decide the epoch's order (with the value a checkpoint written before
the key existed means): mid-epoch, another value would repeat and skip samples."""


def load_resume_point(
    run_dir: Path,
    trainer: TrainerConfig,
    plan: BatchPlan,
    order: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The checkpoint to continue from (None: start a new run), checked against the new
    plan, the order's keys (`order`: ORDER_KEYS' values now, see `order_of`), the data
    (`data`: its identity now, see ddp.data.identity) and `trainer.resume`; ConfigError
    naming the file and what changed otherwise. Reads only.

    Under trainer.restart_epoch_on_plan_change=true a change restarts the epoch instead,
    and state["note"] says so in one line."""
    path = run_dir / "checkpoints" / "last.pt"
    if trainer.resume == "never":
        if path.exists() or (run_dir / METRICS_FILE).exists():
            raise ConfigError(
                f"run directory {run_dir} already holds a run and trainer.resume=never; give "
                "another run.name, or trainer.resume=auto to continue it"
            )
        return None
    if not path.exists():
        if trainer.resume == "require":
            raise ConfigError(f"trainer.resume=require but there is no {path} to continue from")
        return None
    state = checkpoint.load(path)
    state["config"] = upgrade_record(state.get("config") or {})  # written before issue 24?
    position = state["position"]
    mid_epoch = position.get("step_in_epoch", 0) > 0  # between epochs the order may change
    change, remedy = what_changed(state.get("data"), data or {}), "restore that data"
    if change is None:
        change, remedy = _plan_change(state, plan, order if mid_epoch else None), "keep it"
    if change is None:
        state["path"] = str(path)
        return state
    if not trainer.restart_epoch_on_plan_change:
        raise ConfigError(
            f"cannot resume {path}: {change} ({remedy}, use a new run.name, or set "
            "trainer.restart_epoch_on_plan_change=true)"
        )
    epoch = position.get("epoch", 0)
    if mid_epoch:  # the saved position means nothing in the new plan: restart the epoch
        position.update(step_in_epoch=0, epoch_sums={})
        state["note"] = f"{change}: epoch {epoch} restarts from its first step"
    else:
        state["note"] = f"{change}: continuing at epoch {epoch}"
    state["note"] += " (trainer.restart_epoch_on_plan_change=true)"
    state["path"] = str(path)
    return state


def _plan_change(
    state: dict[str, Any], plan: BatchPlan, order: dict[str, Any] | None
) -> str | None:
    """The first of PLAN_KEYS (and, mid-epoch, ORDER_KEYS) whose value differs, in words."""
    saved = {k: state["plan"][k] for k in PLAN_KEYS}
    now = {k: getattr(plan, k) for k in PLAN_KEYS}
    if order is not None:
        saved.update(order_of(state.get("config", {})))
        now.update(order)
    changed = [k for k in now if saved.get(k, now[k]) != now[k]]
    return f"{changed[0]} was {saved[changed[0]]}, now {now[changed[0]]}" if changed else None


def order_of(record: dict[str, Any]) -> dict[str, Any]:
    """ORDER_KEYS' values in a config record (as `ddp.compose.as_record` writes one, and
    a checkpoint keeps it), with their defaults where the record lacks them."""
    config = OmegaConf.create(record)
    return {key: OmegaConf.select(config, key, default=d) for key, d in ORDER_KEYS.items()}


def finished(state: dict[str, Any], trainer: TrainerConfig, plateau: dict[str, Any]) -> str | None:
    """Why the checkpoint's run has nothing left to do under this config (max_epochs or
    max_steps reached, or stopped by the plateau tracker), in words; None when it has.

    `plateau` is the plateau group of the config now: a run the tracker stopped goes on
    when those settings changed since (a longer patience, another action), and the
    tracker, reopened in `state`, judges anew with them (state["note"] says so)."""
    position, tracker = state["position"], state["plateau"]
    if trainer.max_epochs is not None and position["epoch"] >= trainer.max_epochs:
        return f"it has trained trainer.max_epochs={trainer.max_epochs} epochs"
    if trainer.max_steps is not None and position["global_step"] >= trainer.max_steps:
        return f"it has made trainer.max_steps={trainer.max_steps} steps"
    if not tracker.get("stopped"):
        return None
    if _decisive(state.get("config", {}).get("plateau", {})) == _decisive(plateau):
        return f"the plateau tracker stopped it at epoch {tracker['last_epoch']}"
    tracker.update(stopped=False, stop_reason=None)
    state["note"] = (
        f"plateau.* changed since the plateau tracker stopped this run at epoch "
        f"{tracker['last_epoch']}: training goes on, judged by the new settings"
    )
    return None


def _decisive(plateau: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in plateau.items() if key != "alert"}
