"""Hydra at the edge: the schemas registered, the config composed and converted once.

`ddp.train` (through @hydra.main) and `ddp-plan` (through Hydra's compose API) both
end in `to_config`, which returns the typed `ddp.config.Config`; nothing below the
entry points sees a DictConfig.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from ddp.config import Config
from ddp.config_moves import upgrade_record
from ddp.errors import ConfigError
from ddp.run_dir import default_run_name, default_sweep_name

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
"""The config tree beside the package (an editable install or a clone)."""


def register() -> None:
    ConfigStore.instance().store(name="config_schema", node=Config)
    if not OmegaConf.has_resolver("ddp.run_name"):
        OmegaConf.register_new_resolver("ddp.run_name", _run_name)
        # Cached in the config: Hydra copies the cache into each sweep point's config,
        # so a job that submitit runs on a node resolves the directory its launcher
        # made, not one named after its own SLURM job.
        OmegaConf.register_new_resolver(
            "ddp.sweep_name", lambda name=None: name or default_sweep_name(), use_cache=True
        )


def _run_name(name: str | None = None, experiment: str = "default") -> str:
    """run.name, else the stable default for this command line (see ddp.run_dir)."""
    if name:
        return name
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    return default_run_name(experiment, list(overrides))


def to_config(cfg: Any) -> Config:
    """Composed DictConfig -> typed Config (raises ConfigError naming the key)."""
    try:
        config = OmegaConf.to_object(cfg)  # runs every schema's __post_init__
    except ConfigError:
        raise
    except MissingMandatoryValue as exc:
        raise ConfigError(f"{exc.full_key} is not set (give {exc.full_key}=...)") from exc
    except (ValueError, OmegaConfBaseException) as exc:
        raise ConfigError(str(exc).strip().splitlines()[0]) from exc
    for group in ("model", "optim"):  # plain dicts below this point
        value = getattr(config, group)
        if not isinstance(value, dict):
            setattr(config, group, OmegaConf.to_container(value, resolve=True))
    config.__post_init__()
    return config


def compose(overrides: list[str] = ()) -> Config:
    """The typed config for these overrides, as the trainer would see it (no run started)."""
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_config(hydra_compose("config", overrides=list(overrides)))


def from_record(record: dict[str, Any], overrides: list[str] = ()) -> Config:
    """The typed config a checkpoint was trained with (its resolved record, in the layout
    of today's schema: see `ddp.config.upgrade_record`), with `key=value` overrides on top
    (e.g. data.root=... to evaluate on data moved since)."""
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(Config),
            upgrade_record(record),
            OmegaConf.from_dotlist(list(overrides)),
        )
    except OmegaConfBaseException as exc:
        raise ConfigError(str(exc).strip().splitlines()[0]) from exc
    return to_config(merged)


def as_record(config: Config) -> dict[str, Any]:
    """The resolved config as plain containers (for checkpoints, W&B and metrics.jsonl)."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
