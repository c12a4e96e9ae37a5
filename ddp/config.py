"""The typed config schemas: types, ranges and documentation; the values live in `conf/`.

Every field is MISSING here and set by the YAML files under conf/, so there is one
place for each value. Hydra composes conf/ against these dataclasses (registered by
`ddp.compose`): OmegaConf rejects a wrong type naming the key, `__post_init__` a value
out of range, the same way. The entry point converts the composed config once; below
it, code receives these dataclasses (or plain values) and no module imports omegaconf.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from ddp.data_config import (
    AugmentConfig,
    DataConfig,
    LoaderConfig,
    RemoteConfig,
    StreamConfig,
)
from ddp.validate import integer_at_least, one_of, positive_or_none, require

MISSING: Any = "???"  # OmegaConf's marker for a mandatory value (omegaconf.MISSING)

__all__ = [
    "AugmentConfig",
    "BatchConfig",
    "CheckpointConfig",
    "CompileConfig",
    "Config",
    "DataConfig",
    "LoaderConfig",
    "LoggerConfig",
    "PlateauConfig",
    "RemoteConfig",
    "RunConfig",
    "ScheduleConfig",
    "StreamConfig",
    "TrainerConfig",
    "WandbConfig",
]


@dataclass
class BatchConfig:
    global_size: int = MISSING
    """G: samples behind one optimizer update, fixed whatever the world size."""
    micro_size: Any = MISSING
    """Samples one process runs forward/backward at once; accumulation is derived. `auto`
    (CUDA only): the largest that fits in GPU memory, found by trial steps (ddp.micro_size)."""
    drop_last: bool = MISSING
    """Drop the remainder of N / G, or pad the last global batch with the epoch's first samples."""

    def __post_init__(self) -> None:
        m = self.micro_size
        ok = m == "auto" or (isinstance(m, int) and not isinstance(m, bool) and m >= 1)
        require(ok, f"batch.micro_size={m!r} must be a positive integer or auto")


@dataclass
class ScheduleConfig:
    name: str = MISSING
    """warmup_cosine | constant | plateau (constant; the plateau tracker lowers it)."""
    warmup_iterations: int = MISSING
    """Optimizer steps over which the learning rate rises linearly from 0 to its peak."""
    min_lr_ratio: float = MISSING
    """Cosine floor as a fraction of the peak learning rate."""
    lr_scaling: str = MISSING
    """none | linear | sqrt: scale optim.lr by global_size / base_global_size."""
    base_global_size: int = MISSING
    """The global batch that optim.lr was tuned for."""

    def __post_init__(self) -> None:
        one_of("schedule.name", self.name, ("warmup_cosine", "constant", "plateau"))
        one_of("schedule.lr_scaling", self.lr_scaling, ("none", "linear", "sqrt"))
        require(self.warmup_iterations >= 0, "schedule.warmup_iterations must be >= 0")
        require(0.0 <= self.min_lr_ratio <= 1.0, "schedule.min_lr_ratio must be in [0, 1]")
        require(self.base_global_size >= 1, "schedule.base_global_size must be >= 1")


@dataclass
class CheckpointConfig:
    """`trainer.checkpoint`: checkpoints between the end-of-epoch ones (last.pt, and best.pt
    when the monitored metric improved), so that a kill loses less than an epoch."""

    every_steps: int | None = MISSING
    """Also save every this many optimizer steps; null: not by steps."""
    every_minutes: float | None = MISSING
    """Also save when this many minutes passed since the last save; null: not by time."""

    def __post_init__(self) -> None:
        positive_or_none("trainer.checkpoint.every_steps", self.every_steps)
        positive_or_none("trainer.checkpoint.every_minutes", self.every_minutes)


@dataclass
class CompileConfig:
    """`trainer.compile`: torch.compile the model for training (checkpoints hold the plain
    module's weights: they load with or without it)."""

    enabled: bool = MISSING
    """Compile the model (false: eager PyTorch)."""
    mode: str | None = MISSING
    """torch.compile's mode: null (its default), reduce-overhead, max-autotune, ...; set
    only with enabled=true."""
    backend: str = MISSING
    """torch.compile's backend: inductor; eager or aot_eager to debug a compiled run."""

    def __post_init__(self) -> None:
        require(
            self.enabled or self.mode is None,
            f"trainer.compile.mode={self.mode} compiles nothing without "
            "trainer.compile.enabled=true; set it, or leave the mode null",
        )


@dataclass
class TrainerConfig:
    max_epochs: int | None = MISSING
    """null: train until the plateau tracker stops the run."""
    seed: int = MISSING
    """The seed of the epoch order, the augmentation's crops and the model's initial
    weights (each rank adds its rank for its own torch RNG)."""
    device: str = MISSING
    """auto | cpu | cuda (auto: cuda when available)."""
    precision: str = MISSING
    """fp32 | bf16 (autocast) | fp16 (autocast + GradScaler, CUDA only)."""
    grad_clip: float | None = MISSING
    """Max global gradient norm; null disables clipping."""
    channels_last: bool | None = MISSING
    """Keep conv weights and 4-D inputs in channels-last (NHWC) memory order; null: on
    for models with a Conv2d on a CPU (oneDNN ran the small CNN's step in 0.75x the
    time), off on a GPU (there the small CNN ran 83.0 steps/s NCHW vs 67.8 NHWC on an
    H200, fp32)."""
    compile: CompileConfig = MISSING
    """torch.compile for training (conf/trainer/compile/)."""
    backend: str = MISSING
    """auto (nccl on CUDA, gloo on CPU) | nccl | gloo. gloo with CUDA tensors lets
    several ranks share one GPU (NCCL refuses that)."""
    deterministic: bool = MISSING
    """Deterministic kernels (torch.use_deterministic_algorithms; cuBLAS workspace set):
    bitwise-reproducible runs on a GPU, at some speed."""
    sync_every_step: bool | None = MISSING
    """Read each step's totals (loss, flags) on the host right after the step: null
    (auto) does so on a CPU and reads them one step late on a GPU, where the update of
    a non-finite step is skipped on the device, so the GPU never waits for the host;
    true forces the immediate read, false the late one (needs a fused optimizer)."""
    timeout_s: float = MISSING
    """Collective timeout: a dead or stuck peer ends the job after this long."""
    progress: bool = MISSING
    """A progress bar per epoch on rank 0 (shown only when stderr is a terminal)."""
    log_every_steps: int = MISSING
    """Log the training loss and learning rate every this many optimizer steps."""
    checkpoint: CheckpointConfig = MISSING
    """Checkpoints within an epoch (conf/trainer/checkpoint/); every epoch ends with one."""
    nonfinite: str = MISSING
    """stop | skip: what all ranks do when the loss is not finite on any rank."""
    max_skipped_steps: int = MISSING
    """With nonfinite=skip: the run stops once more than this many updates were skipped."""
    resume: str = MISSING
    """auto: continue from the run directory's last checkpoint when there is one, else
    start a new run; never: start a new run, and refuse a directory that holds one;
    require: continue, and refuse a directory without a checkpoint."""
    max_steps: int | None = MISSING
    """Stop after this many optimizer updates (for smoke tests and benchmarks)."""
    init_from: str | None = MISSING
    """Start a new run from these weights (a checkpoint file, or a run directory: its
    best.pt, else last.pt): the model's weights only, not its optimizer or position.
    Fine-tuning; ignored when the run directory has its own checkpoint to resume."""
    restart_epoch_on_plan_change: bool = MISSING
    """Resume a checkpoint whose global batch or data set differs, from the start of its epoch."""
    audit_samples: bool = MISSING
    """Count every sample's uses per epoch over all ranks and log coverage (one all_reduce of N)."""
    noise_scale: bool = MISSING
    """Measure the gradient noise scale B_simple per epoch (batch/noise_scale; ddp.noise_scale):
    the global batch beyond which more samples per step stop buying fewer steps."""
    count_flops: bool = MISSING
    """Count the model's FLOPs per sample at start-up (torch's FlopCounterMode on the first
    micro-batch) for perf/tflops and perf/mfu. The first dispatch mode of a process
    imports torch._dynamo: about 2 s of start-up on a CPU (docs/performance.md)."""
    profile: list[int] | None = MISSING
    """[START, END]: record global steps START..END (from 1) with torch.profiler on every
    rank, into run_dir/profile/ (docs/performance.md); null: no trace."""
    peak_tflops: float | None = MISSING
    """The device's peak TFLOPS at the run's precision, for perf/mfu; null: NVIDIA's
    datasheet figure for A100, H100, H200, L40S and RTX 4090 (ddp.perf.flops)."""
    memory_snapshot: bool = MISSING
    """CUDA: record the allocator's history from the start, and dump it into the run
    directory on an out-of-memory (memory_snapshot_rank<R>.pickle)."""

    def __post_init__(self) -> None:
        require(
            self.max_epochs is None or self.max_epochs >= 1,
            f"trainer.max_epochs={self.max_epochs} must be >= 1 or null",
        )
        one_of("trainer.device", self.device, ("auto", "cpu", "cuda"))
        one_of("trainer.precision", self.precision, ("fp32", "bf16", "fp16"))
        one_of("trainer.nonfinite", self.nonfinite, ("stop", "skip"))
        one_of("trainer.resume", self.resume, ("auto", "never", "require"))
        one_of("trainer.backend", self.backend, ("auto", "nccl", "gloo"))
        require(self.grad_clip is None or self.grad_clip > 0, "trainer.grad_clip must be > 0")
        require(self.timeout_s > 0, f"trainer.timeout_s={self.timeout_s} must be > 0")
        integer_at_least("trainer.log_every_steps", self.log_every_steps, 1)
        integer_at_least("trainer.max_skipped_steps", self.max_skipped_steps, 0)
        positive_or_none("trainer.max_steps", self.max_steps)
        positive_or_none("trainer.peak_tflops", self.peak_tflops)
        if self.profile is not None:
            window = list(self.profile)
            ok = len(window) == 2 and all(isinstance(s, int) and s >= 1 for s in window)
            require(
                ok and window[0] <= window[1],
                f"trainer.profile={window} must be [START, END] global steps, 1 <= START <= END",
            )


@dataclass
class PlateauConfig:
    """What to watch and what to do when it stops improving (the plateau tracker's input)."""

    monitor: str = MISSING
    """Validation metric to watch (a key the trainer logs)."""
    mode: str = MISSING
    """"max": higher is better (accuracy); "min": lower is better (loss)."""
    patience: int = MISSING
    """Epochs without improvement that make a plateau (0: the first one does)."""
    min_delta: float = MISSING
    """Smallest change that counts as an improvement."""
    min_delta_mode: str = MISSING
    """"abs": min_delta in metric units; "rel": a fraction of |best|."""
    cooldown: int = MISSING
    """Epochs after an LR reduction (or a report) during which no bad epoch is counted."""
    max_reductions: int | None = MISSING
    """With action=reduce_lr: after this many reductions the next plateau stops training."""
    warmup_epochs: int = MISSING
    """Epochs ignored at the start (0..warmup_epochs-1): noisy early values set no best."""
    factor: float = MISSING
    """LR multiplier applied on each reduction."""
    min_lr: float = MISSING
    """Floor for the reduced learning rate (see PlateauTracker.scaled_lr)."""
    action: str = MISSING
    """What a plateau does: stop training, reduce the LR, or only report it."""
    alert: bool = MISSING
    """Send a W&B alert on each plateau event."""
    alert_level: str = MISSING
    """INFO | WARN | ERROR: the level of those alerts."""

    def __post_init__(self) -> None:
        one_of("plateau.mode", self.mode, ("min", "max"))
        one_of("plateau.min_delta_mode", self.min_delta_mode, ("abs", "rel"))
        one_of("plateau.action", self.action, ("stop", "reduce_lr", "none"))
        one_of("plateau.alert_level", self.alert_level, ("INFO", "WARN", "ERROR"))
        require(bool(self.monitor), "plateau.monitor must name a metric, e.g. val/accuracy")
        for key in ("patience", "cooldown", "warmup_epochs"):
            integer_at_least(f"plateau.{key}", getattr(self, key), 0)
        if self.max_reductions is not None:
            integer_at_least("plateau.max_reductions", self.max_reductions, 0)
        require(
            math.isfinite(self.min_delta) and self.min_delta >= 0,
            f"plateau.min_delta={self.min_delta} must be a finite value >= 0",
        )
        require(0.0 < self.factor < 1.0, f"plateau.factor={self.factor} must be in (0, 1)")
        require(
            math.isfinite(self.min_lr) and self.min_lr >= 0,
            f"plateau.min_lr={self.min_lr} must be a finite value >= 0",
        )


@dataclass
class WandbConfig:
    enabled: bool = MISSING
    """Track the run with W&B (rank 0 only); false: metrics.jsonl alone."""
    mode: str = MISSING
    """offline | online | disabled. Offline by default (clusters rarely reach the
    internet); the environment's WANDB_MODE wins when set."""
    project: str = MISSING
    """The W&B project the run belongs to."""
    entity: str | None = MISSING
    """The W&B user or team; null: the logged-in user's default."""
    name: str | None = MISSING
    """Run name; null: the experiment and its overrides."""
    group: str | None = MISSING
    """Runs of one sweep share a group; null: the Hydra sweep's name."""
    job_type: str = MISSING
    """W&B's job type, to tell training runs from others in a project (train)."""
    tags: list[str] = MISSING
    """Tags on the W&B run (experiments set their own)."""
    dir: str | None = MISSING
    """Where wandb writes its files; null: the run directory."""
    system_metrics: bool = MISSING
    """Let W&B sample CPU/GPU/memory use in the background (costs CPU on busy nodes)."""
    console_summary: bool = MISSING
    """W&B's own console output: its start lines and, after the trainer's `done` line,
    its end-of-run block (sparklines, summary, sync hint; some 30 lines). false: one line
    at the start instead, saying where the run is and how to sync it (errors still show)."""

    def __post_init__(self) -> None:
        one_of("logger.wandb.mode", self.mode, ("offline", "online", "disabled"))

    def resolved_mode(self) -> str:
        mode = os.environ.get("WANDB_MODE") or self.mode
        # "dryrun" and "run" are W&B's old spellings of offline and online.
        return {"dryrun": "offline", "run": "online"}.get(mode, mode)

    @property
    def active(self) -> bool:
        return self.enabled and self.resolved_mode() != "disabled"


@dataclass
class LoggerConfig:
    wandb: WandbConfig = MISSING
    """Weights & Biases (conf/logger/)."""
    curves: bool = MISSING
    """Save the learning-curve PNG in the run directory (and log it to W&B)."""


@dataclass
class RunConfig:
    root: str = MISSING
    """Directory holding the run directories (and the sweeps' directories)."""
    name: str | None = MISSING
    """Run directory name; null: from SLURM_JOB_ID, then TORCHELASTIC_RUN_ID."""


@dataclass
class Config:
    model: Any = MISSING
    """`_target_` + kwargs of an nn.Module: ours (ddp.models) or the user's."""
    optim: Any = MISSING
    """`_target_` + kwargs of a torch.optim.Optimizer (lr required); params are passed in."""
    data: DataConfig = MISSING
    """The training and validation data and how they are read (conf/data/)."""
    batch: BatchConfig = MISSING
    """The global batch and the micro-batch (conf/batch/)."""
    schedule: ScheduleConfig = MISSING
    """The learning-rate schedule (conf/schedule/)."""
    trainer: TrainerConfig = MISSING
    """How training runs: device, precision, checkpoints, stops (conf/trainer/)."""
    plateau: PlateauConfig = MISSING
    """The plateau tracker (conf/plateau/)."""
    logger: LoggerConfig = MISSING
    """W&B and the learning-curve PNG (conf/logger/)."""
    run: RunConfig = MISSING
    """Where the run directory is and its name."""
    experiment_name: str = MISSING
    """The experiment's name: the run's default name and the W&B name's prefix."""

    def __post_init__(self) -> None:
        for group in ("model", "optim"):
            spec = getattr(self, group)
            require(
                isinstance(spec, dict) and "_target_" in spec,
                f"{group}._target_ is missing: name the class to build",
            )
        lr = self.optim.get("lr")
        require(
            isinstance(lr, int | float) and lr > 0, f"optim.lr={lr!r} must be a positive number"
        )
