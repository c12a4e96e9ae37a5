"""Config values for unit tests that build a schema by hand (the shipped values live in
conf/; these are the neutral ones the unit tests reason about)."""

from __future__ import annotations

from ddp.config import PlateauConfig, WandbConfig

PLATEAU = dict(
    monitor="val/accuracy",
    mode="max",
    patience=5,
    min_delta=0.0,
    min_delta_mode="abs",
    cooldown=0,
    max_reductions=3,
    warmup_epochs=0,
    factor=0.1,
    min_lr=0.0,
    action="stop",
    alert=True,
    alert_level="WARN",
)

WANDB = dict(
    enabled=True,
    mode="offline",
    project="ddp",
    entity=None,
    name=None,
    group=None,
    job_type="train",
    tags=[],
    dir=None,
    system_metrics=False,
    console_summary=False,
)


def plateau_config(**overrides) -> PlateauConfig:
    return PlateauConfig(**{**PLATEAU, **overrides})


def wandb_config(**overrides) -> WandbConfig:
    return WandbConfig(**{**WANDB, **overrides})
