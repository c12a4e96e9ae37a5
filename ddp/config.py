"""Typed config schemas, registered in Hydra's ConfigStore.

The values live in `conf/*.yaml`; these dataclasses give them types and ranges.
OmegaConf rejects a wrong type with the key's name; `__post_init__` rejects a
value out of range the same way. The entry point converts the composed config
once (`OmegaConf.to_object`) and below it no module sees omegaconf.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from ddp.plateau import PlateauConfig
from ddp.tracking import WandbConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
"""The config tree beside the package (an editable install or a clone)."""


class ConfigError(ValueError):
    """A config value out of range; the message names the key."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, f"{key}={value!r} must be one of {', '.join(choices)}")


@dataclass
class DataConfig:
    root: str = "data/digits"
    """Directory holding one sub-directory of shards + manifest.json per split."""
    train_split: str = "train"
    val_split: str = "val"
    num_workers: int = 0
    """DataLoader worker processes per rank (0: load in the training process)."""
    pin_memory: bool = True
    """Page-locked host batches; only takes effect on CUDA."""
    prefetch_factor: int = 2
    on_error: str = "raise"
    """raise: a bad sample stops the job; skip: it is counted, logged and masked out."""
    input_key: str = "npy"
    target_key: str = "cls"
    urls: Any = None
    """Streaming mode: shard URLs (list or brace pattern; pipe:, http(s), paths), read in order."""
    num_samples: int | None = None
    """Training samples behind `urls` when no manifest.json sits beside them."""
    shuffle_buffer: int = 1000
    """Streaming mode: samples in each stream's shuffle buffer."""
    transform: Any = None
    """`_target_` of a callable applied to each training input tensor (e.g. torchvision's)."""
    in_memory_max_mb: float = 256.0
    """A split whose decoded inputs fit in this many MiB is decoded once and served from
    memory by each process (0: always read the shards)."""

    def __post_init__(self) -> None:
        _require(self.num_workers >= 0, f"data.num_workers={self.num_workers} must be >= 0")
        _require(self.prefetch_factor >= 1, "data.prefetch_factor must be >= 1")
        _one_of("data.on_error", self.on_error, ("raise", "skip"))
        _require(self.in_memory_max_mb >= 0, "data.in_memory_max_mb must be >= 0")


@dataclass
class BatchConfig:
    global_size: int = 64
    """G: samples behind one optimizer update, fixed whatever the world size."""
    micro_size: int = 32
    """Samples one process runs forward/backward at once; accumulation is derived."""
    drop_last: bool = False
    """Drop the remainder of N / G, or pad the last global batch with the epoch's first samples."""


@dataclass
class ScheduleConfig:
    name: str = "warmup_cosine"
    """warmup_cosine | constant | plateau (constant; the plateau tracker lowers it)."""
    warmup_iterations: int = 0
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of the peak learning rate."""
    lr_scaling: str = "none"
    """none | linear | sqrt: scale optim.lr by global_size / base_global_size."""
    base_global_size: int = 64
    """The global batch that optim.lr was tuned for."""

    def __post_init__(self) -> None:
        _one_of("schedule.name", self.name, ("warmup_cosine", "constant", "plateau"))
        _one_of("schedule.lr_scaling", self.lr_scaling, ("none", "linear", "sqrt"))
        _require(self.warmup_iterations >= 0, "schedule.warmup_iterations must be >= 0")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "schedule.min_lr_ratio must be in [0, 1]")
        _require(self.base_global_size >= 1, "schedule.base_global_size must be >= 1")


@dataclass
class TrainerConfig:
    max_epochs: int | None = None
    """None: train until the plateau tracker stops the run."""
    seed: int = 0
    device: str = "auto"
    """auto | cpu | cuda (auto: cuda when available)."""
    precision: str = "fp32"
    """fp32 | bf16 (autocast) | fp16 (autocast + GradScaler, CUDA only)."""
    grad_clip: float | None = 1.0
    """Max global gradient norm; None disables clipping."""
    channels_last: bool | None = None
    """Keep conv weights and 4-D inputs in channels-last (NHWC) memory order, which
    oneDNN and cuDNN convolutions run faster; None: on for models with a Conv2d."""
    timeout_s: float = 300.0
    """Collective timeout: a dead or stuck peer ends the job after this long."""
    progress: bool = True
    log_every_steps: int = 10
    checkpoint_every_steps: int | None = None
    checkpoint_every_minutes: float | None = None
    nonfinite: str = "stop"
    """stop | skip: what all ranks do when the loss is not finite on any rank."""
    max_skipped_steps: int = 10
    resume: bool = True
    """Continue from the run directory's last checkpoint when there is one."""
    max_steps: int | None = None
    """Stop after this many optimizer updates (for smoke tests and benchmarks)."""
    restart_epoch_on_plan_change: bool = False
    """Resume a checkpoint whose global batch or data set differs, from the start of its epoch."""
    audit_samples: bool = False
    """Count every sample's uses per epoch over all ranks and log coverage (one all_reduce of N)."""

    def __post_init__(self) -> None:
        _require(
            self.max_epochs is None or self.max_epochs >= 1,
            f"trainer.max_epochs={self.max_epochs} must be >= 1 or null",
        )
        _one_of("trainer.device", self.device, ("auto", "cpu", "cuda"))
        _one_of("trainer.precision", self.precision, ("fp32", "bf16", "fp16"))
        _one_of("trainer.nonfinite", self.nonfinite, ("stop", "skip"))
        _require(self.grad_clip is None or self.grad_clip > 0, "trainer.grad_clip must be > 0")
        _require(self.timeout_s > 0, f"trainer.timeout_s={self.timeout_s} must be > 0")
        _require(self.log_every_steps >= 1, "trainer.log_every_steps must be >= 1")
        for key in ("checkpoint_every_steps", "checkpoint_every_minutes", "max_steps"):
            value = getattr(self, key)
            _require(value is None or value > 0, f"trainer.{key}={value} must be > 0 or null")


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    curves: bool = True
    """Save the learning-curve PNG in the run directory (and log it to W&B)."""


@dataclass
class RunConfig:
    root: str = "runs"
    name: str | None = None
    """Run directory name; default: from SLURM_JOB_ID, then TORCHELASTIC_RUN_ID."""


@dataclass
class Config:
    model: Any = MISSING
    """`_target_` + kwargs of an nn.Module: ours (ddp.models) or the user's."""
    optim: Any = MISSING
    """`_target_` + kwargs of a torch.optim.Optimizer (lr required); params are passed in."""
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    plateau: PlateauConfig = field(default_factory=PlateauConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    experiment_name: str = "default"

    def __post_init__(self) -> None:
        for group in ("model", "optim"):
            spec = getattr(self, group)
            _require(
                isinstance(spec, dict) and "_target_" in spec,
                f"{group}._target_ is missing: name the class to build",
            )
        lr = self.optim.get("lr")
        _require(
            isinstance(lr, int | float) and lr > 0, f"optim.lr={lr!r} must be a positive number"
        )


def run_id() -> str:
    """The run directory's name: the same on every rank and across restarts.

    SLURM's job id survives a requeue; torchrun's run id survives --max-restarts.
    A single plain-python process falls back to a timestamp (give run.name to resume).
    """
    if job := os.environ.get("SLURM_JOB_ID"):
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{job}" + (f"_{task}" if task else "")
    if rdzv := os.environ.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun-{rdzv}"
    import datetime as dt

    return dt.datetime.now().strftime("local-%Y%m%d-%H%M%S")


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    if not OmegaConf.has_resolver("ddp.run_name"):
        # Cached: a timestamp fallback must not change between two reads.
        OmegaConf.register_new_resolver(
            "ddp.run_name", lambda name=None: name or run_id(), use_cache=True
        )


def to_config(cfg: Any) -> Config:
    """Compose-time DictConfig -> typed Config (raises ConfigError / ValidationError)."""
    try:
        obj = OmegaConf.to_object(cfg)  # runs every schema's __post_init__
    except ConfigError:
        raise
    except ValueError as exc:  # a schema owned by its module (plateau, tracking)
        raise ConfigError(str(exc)) from exc
    for group in ("model", "optim"):  # plain dicts below this point
        value = getattr(obj, group)
        if not isinstance(value, dict):
            setattr(obj, group, OmegaConf.to_container(value, resolve=True))
    obj.__post_init__()
    return obj
