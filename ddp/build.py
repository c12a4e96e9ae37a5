"""Set-up from config: the model and its DDP wrapper, the optimizer and schedule, the
loaders, precision, and the W&B names. Everything here runs once, before the loop."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from hydra.utils import instantiate
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp import checkpoint
from ddp.config import CompileConfig, Config, WandbConfig
from ddp.data.batch import LoaderOptions, TrainBatches
from ddp.data.device import InputPipeline
from ddp.data.device_jpeg import check_device_decoder
from ddp.data.images import ImageAugment
from ddp.data.loaders import EvalLoader, build_eval_loader, build_train_loader
from ddp.data.splits import Splits
from ddp.data.streaming import build_stream_loader
from ddp.distributed.group import DistEnv
from ddp.errors import ConfigError
from ddp.plan import BatchPlan
from ddp.plateau import PlateauTracker
from ddp.run_dir import run_label
from ddp.schedule import LRSchedule, scaled_lr
from ddp.state import Training
from ddp.step import skips_on_device


def build(spec: dict, key: str, **kwargs):
    """`instantiate(spec)`, or ConfigError naming the key: a typo in `_target_`, a wrong
    argument or a constructor that raises is bad input, found before any process group."""
    try:
        return instantiate(spec, **kwargs)
    except Exception as exc:  # noqa: BLE001 - whatever the user's constructor raises
        target = spec.get("_target_") if isinstance(spec, dict) else spec
        raise ConfigError(f"{key}: cannot build {target}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    """One line from Hydra's message (or the constructor's own error)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("full_key:")]
    text = " ".join(lines).replace(", set env var HYDRA_FULL_ERROR=1 to see chained exception", "")
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" ({type(cause).__name__}: {' '.join(str(cause).split())})"
    return text


def build_model(config: Config, device: torch.device) -> torch.nn.Module:
    """The user's module on `device`, conv layouts as `channels_last` decides."""
    model = build(config.model, "model")
    if channels_last(
        config, model, device
    ):  # before DDP: its buckets follow the parameters' layout
        model = model.to(memory_format=torch.channels_last)
    return model.to(device)


def channels_last(config: Config, model: torch.nn.Module, device: torch.device) -> bool:
    """trainer.channels_last, or (null) on a CPU whether the model has a 2-D convolution:
    there (oneDNN) a small CNN's step took 0.75x the time (bench/overhead.py); on a GPU
    the same CNN ran faster in NCHW (83.0 vs 67.8 steps/s on an H200, issue 12)."""
    if config.trainer.channels_last is not None:
        return config.trainer.channels_last
    return device.type == "cpu" and any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def build_training(
    config: Config, plan: BatchPlan, device: torch.device
) -> tuple[Training, LRSchedule]:
    """Model, optimizer, grad scaler and plateau tracker (no DDP yet: that needs the
    process group), and the learning-rate schedule."""
    if config.trainer.precision == "fp16" and device.type != "cuda":
        raise ConfigError("trainer.precision=fp16 needs a CUDA device (its grad scaler); use bf16")
    model = build_model(config, device)
    if config.trainer.init_from:  # fine-tuning (a resume then restores its own weights)
        start_from(model, Path(config.trainer.init_from))
    s = config.schedule
    peak = scaled_lr(config.optim["lr"], plan.global_size, s.base_global_size, s.lr_scaling)
    optimizer = build(config.optim, "optim", params=model.parameters(), lr=peak)
    epochs = config.trainer.max_epochs
    total = epochs * plan.iterations_per_epoch if epochs else None
    schedule = LRSchedule(peak, s.name, s.warmup_iterations, total, s.min_lr_ratio)
    scaler = torch.amp.GradScaler(device.type, enabled=config.trainer.precision == "fp16")
    training = Training(model, model, optimizer, scaler, PlateauTracker(config.plateau))
    return training, schedule


def start_from(model: torch.nn.Module, path: Path) -> None:
    """The weights of a trained run (not its optimizer or position) into `model`."""
    ckpt = checkpoint.find(path)
    checkpoint.load_weights(model, checkpoint.load(ckpt)["model"], f"trainer.init_from={ckpt}")


def wrap_ddp(training: Training, env: DistEnv, compile: CompileConfig | None = None) -> None:
    """The module that trains: the model, compiled if asked (trainer.compile.enabled), in its DDP
    wrapper when there is a process group. Checkpoints keep using `training.model`, so
    they load with or without compilation."""
    module = training.model
    if compile is not None and compile.enabled:
        module = torch.compile(module, mode=compile.mode, backend=compile.backend)
    if env.distributed:
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        module = DDP(module, device_ids=device_ids)
    training.ddp_model = module


def set_numerics(config: Config, device: torch.device) -> None:
    """Deterministic kernels when asked (bitwise-reproducible GPU runs); else let cuDNN
    pick the fastest convolution for the (fixed) input shapes."""
    if config.trainer.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def step_lag(config: Config, training: Training, device: torch.device) -> int:
    """How many steps late the host reads a step's totals (see ddp.step.Stepper)."""
    sync = config.trainer.sync_every_step
    can_lag = skips_on_device(training)
    if sync is False and not can_lag:
        raise ConfigError(
            "trainer.sync_every_step=false needs an optimizer that skips a step on the device "
            "(fused=true AdamW, Adam or SGD) and no fp16 grad scaler"
        )
    if sync is None:
        return int(can_lag and device.type == "cuda")
    return 0 if sync else 1


def autocast_for(config: Config, device: torch.device) -> Callable[[], object]:
    precision = config.trainer.precision
    if precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def input_pipeline(config: Config, model: torch.nn.Module, device: torch.device) -> InputPipeline:
    """What a batch becomes on the device: float CHW in [0, 1], normalised, in the
    model's memory order."""
    norm = config.data.normalize or {}
    layout = channels_last(config, model, device)
    return InputPipeline(device, layout, norm.get("mean"), norm.get("std"))


def loader_options(config: Config, device: torch.device) -> LoaderOptions:
    """data.loader as it is, for batches that train on `device`, with the sample keys."""
    d = config.data
    return LoaderOptions(
        loader=d.loader,
        device=device,
        input_key=d.input_key,
        target_key=d.target_key,
        num_classes=config.model.get("num_classes"),
        classes=d.classes,
        window_shards=d.window_shards,
    )


def image_augment(config: Config, train: bool) -> ImageAugment | None:
    """data.augment for the training or the validation split (None: inputs as stored)."""
    a = config.data.augment
    if a is None:
        return None
    return ImageAugment(
        size=a.size,
        train=train,
        seed=config.trainer.seed,
        scale=(a.scale[0], a.scale[1]),
        ratio=(a.ratio[0], a.ratio[1]),
        flip=a.flip,
        eval_crop=a.eval_crop,
        placement=a.placement,  # type: ignore[arg-type]
    )


def build_loaders(
    config: Config, plan: BatchPlan, rank: int, splits: Splits, device: torch.device
) -> tuple[TrainBatches, EvalLoader]:
    """Open the shards (a missing or mismatched one fails here, before any collective)."""
    d, seed = config.data, config.trainer.seed
    options = loader_options(config, device)
    transform = build(d.transform, "data.transform") if d.transform else None  # training only
    if d.augment is not None and d.augment.placement == "device":
        check_device_decoder(device)
    if splits.stream is not None:  # streaming: sequential reads, exact batch counts
        train: TrainBatches = build_stream_loader(
            splits.stream, plan, rank, seed, options, d.stream.shuffle_buffer, transform
        )
    else:
        train = build_train_loader(
            splits.train_dir, plan, rank, seed, options, transform, splits.train,
            image_augment(config, train=True), splits.train_remote,
        )  # fmt: skip
    val = build_eval_loader(
        splits.val_dir, plan.micro_size, rank, plan.world_size, options, splits.val,
        images=image_augment(config, train=False), remote=splits.val_remote,
    )  # fmt: skip
    return train, val


def wandb_config(config: Config, sweep_dir: Path | None, overrides: list[str]) -> WandbConfig:
    """Group = the Hydra sweep; name = the experiment and what its overrides change
    (unless set): `digits-batch.global_size=128,model=mlp`, no paths."""
    w = config.logger.wandb
    group = w.group or (sweep_dir.name if sweep_dir is not None else None)
    return replace(w, group=group, name=w.name or run_label(config.experiment_name, overrides))
