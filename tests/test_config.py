"""The config tree: every value lives in conf/, every option of every group composes
against the typed schema, and a bad value is refused naming its key."""

from __future__ import annotations

import pytest

from ddp.compose import CONF_DIR, compose
from ddp.config import Config
from ddp.errors import ConfigError

GROUPS = sorted(
    p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("hydra", "experiment")
)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "override",
    [f"{g}={o}" for g in GROUPS for o in options(g)]
    + [f"experiment={o}" for o in options("experiment")],
)
def test_every_option_composes_to_a_typed_config(override: str) -> None:
    needs = {  # what such an option leaves to the user
        "data=shards": ["data.root=/data"],
        "model=custom": ["model._target_=torchvision.models.resnet18"],
    }
    config = compose([override, *needs.get(override, [])])
    assert isinstance(config, Config)


def test_the_schema_holds_no_values() -> None:
    """A value in the schema could disagree with the YAML; MISSING cannot."""
    from dataclasses import fields

    from ddp import config as schema

    for cls in (
        schema.DataConfig,
        schema.AugmentConfig,
        schema.TrainerConfig,
        schema.PlateauConfig,
    ):
        for f in fields(cls):
            assert f.default == schema.MISSING, f"{cls.__name__}.{f.name}"


def test_a_value_missing_from_the_yaml_is_named() -> None:
    with pytest.raises(ConfigError, match="data.root"):
        compose(["data=shards"])
