"""Config values for unit tests that build a schema by hand (the shipped values live in
conf/; these are the neutral ones the unit tests reason about)."""

from __future__ import annotations

from dataclasses import fields, replace

from ddp.config import PlateauConfig, WandbConfig
from ddp.data.batch import PLAIN, LoaderOptions
from ddp.data_config import LoaderConfig

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


def loader_options(**overrides) -> LoaderOptions:
    """LoaderOptions for tests that build loaders themselves: data.loader's fields among
    `overrides` change ddp.data.batch.PLAIN (`num_workers=2`), the others are the
    options' own (`input_key="png"`)."""
    names = {f.name for f in fields(LoaderConfig)}
    loader = replace(PLAIN, **{k: v for k, v in overrides.items() if k in names})
    return LoaderOptions(loader, **{k: v for k, v in overrides.items() if k not in names})
