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

from ddp.validate import integer_at_least, one_of, positive_or_none, require

MISSING: Any = "???"  # OmegaConf's marker for a mandatory value (omegaconf.MISSING)

__all__ = [
    "AugmentConfig",
    "BatchConfig",
    "Config",
    "DataConfig",
    "LoggerConfig",
    "PlateauConfig",
    "RunConfig",
    "ScheduleConfig",
    "TrainerConfig",
    "WandbConfig",
]


@dataclass
class AugmentConfig:
    """Image decoding and augmentation (ddp.data.images): at training time a random-resized
    crop and a horizontal flip, at evaluation time a center crop, both resized to `size`;
    each sample's crop drawn from (trainer.seed, epoch, sample index)."""

    placement: str = MISSING
    """host: decoded (libjpeg-turbo) and augmented in the DataLoader workers, uint8 crops
    cross to the device; device: the JPEG bytes cross, a GPU decodes them (nvJPEG) and
    crops there (on a CPU-only run: in the training process)."""
    size: int = MISSING
    """Side of the square the crops are resized to (e.g. 224)."""
    scale: list[float] = MISSING
    """[min, max] area of a training crop as a fraction of the image (0.08-1: ImageNet's)."""
    ratio: list[float] = MISSING
    """[min, max] aspect (width / height) of a training crop before resizing."""
    flip: bool = MISSING
    """Mirror a training crop left-right with probability 1/2."""
    eval_crop: float = MISSING
    """Evaluation keeps the centered square of this fraction of the shorter side
    (0.875: resize to size / 0.875, center-crop size)."""

    def __post_init__(self) -> None:
        one_of("data.augment.placement", self.placement, ("host", "device"))
        integer_at_least("data.augment.size", self.size, 1)
        for key in ("scale", "ratio"):
            low_high = list(getattr(self, key))
            require(
                len(low_high) == 2 and 0 < low_high[0] <= low_high[1],
                f"data.augment.{key}={low_high} must be [min, max] with 0 < min <= max",
            )
        require(self.scale[1] <= 1, f"data.augment.scale={list(self.scale)} must be within (0, 1]")
        require(
            0 < self.eval_crop <= 1, f"data.augment.eval_crop={self.eval_crop} must be in (0, 1]"
        )


@dataclass
class DataConfig:
    root: str = MISSING
    """Directory holding one sub-directory of shards + manifest.json per split."""
    train_split: str = MISSING
    val_split: str = MISSING
    num_workers: int = MISSING
    """DataLoader worker processes per rank (0: load in the training process)."""
    pin_memory: bool = MISSING
    """Page-locked host batches; only takes effect on CUDA."""
    prefetch_factor: int = MISSING
    on_error: str = MISSING
    """raise: a bad sample stops the job; skip: it is counted, logged and masked out."""
    input_key: str = MISSING
    """Member extension holding the input (npy, png, jpg, ...); `jpg;png;jpeg;webp`: the
    first of these a sample has (webdataset's spelling)."""
    target_key: str = MISSING
    """Member holding the label: an extension (`cls`), alternatives (`cls;txt`), or a
    field of a JSON member (`json:label`, `json:meta.class`)."""
    classes: list[str] | None = MISSING
    """Class names in id order, for labels given as names; null: the manifest's
    meta.classes (recorded by `ddp-shards prepare imagefolder`), if any."""
    urls: Any = MISSING
    """Streaming mode: shard URLs (list or brace pattern; pipe:, http(s), paths), read in
    order; null: the indexed splits under `root`."""
    num_samples: int | None = MISSING
    """Training samples behind `urls` when no manifest.json sits beside them."""
    shuffle_buffer: int = MISSING
    """Streaming mode: samples in each stream's shuffle buffer."""
    window_shards: int | None = MISSING
    """The training order: null shuffles all samples; k puts the shards in a random order
    and shuffles the samples within each window of k shards (every sample still once per
    epoch; a stretch of the epoch reads k shards: for remote splits bigger than the cache)."""
    transform: Any = MISSING
    """`_target_` of a callable applied to each training input tensor (e.g. torchvision's)."""
    in_memory_max_mb: float = MISSING
    """A split whose decoded inputs fit in this many MiB is decoded once and served from
    memory by each process (0: always read the shards)."""
    on_device: bool = MISSING
    """On a GPU, keep such an in-memory split in GPU memory: a micro-batch is a gather
    there and nothing crosses the bus per step (no effect on a CPU)."""
    normalize: Any = MISSING
    """{mean: [...], std: [...]} per channel, applied on the device after uint8 images
    are scaled to [0, 1]; null: none."""
    augment: AugmentConfig | None = MISSING
    """Decode image members and augment them (conf/data/augment/); null: inputs as stored."""
    cache_dir: str | None = MISSING
    """Where shards of remote splits (root or a split at http(s):// or s3://) are kept,
    shared by the processes of a node; null: $XDG_CACHE_HOME/ddp/shards (~/.cache/...)."""
    cache_max_gb: float = MISSING
    """The cache's bound: least recently used shards no process has open are evicted."""
    remote_timeout_s: float = MISSING
    """How long a remote fetch retries (exponential backoff) before the job stops, exit 2."""
    s3_endpoint: str | None = MISSING
    """An S3-compatible store's endpoint URL; null: AWS_ENDPOINT_URL, else AWS's."""
    prefetch_shards: int = MISSING
    """Remote shards the training loader fetches ahead of the epoch order's needs."""

    def __post_init__(self) -> None:
        require(self.cache_max_gb > 0, f"data.cache_max_gb={self.cache_max_gb} must be > 0")
        require(
            self.remote_timeout_s > 0,
            f"data.remote_timeout_s={self.remote_timeout_s} must be > 0",
        )
        require(self.prefetch_shards >= 0, "data.prefetch_shards must be >= 0")
        if self.augment is not None:
            require(not self.urls, "data.augment needs indexed shards: unset data.urls")
            require(
                self.augment.placement == "host" or self.transform is None,
                "data.transform runs on the host: not with data.augment.placement=device",
            )
        if self.normalize is not None:
            n = self.normalize
            ok = isinstance(n, dict) and {"mean", "std"} <= set(n)
            require(ok, "data.normalize must be null or {mean: [...], std: [...]}")
            require(
                len(n["mean"]) == len(n["std"]) and all(v > 0 for v in n["std"]),
                "data.normalize: mean and std need one value per channel, std > 0",
            )
        require(self.num_workers >= 0, f"data.num_workers={self.num_workers} must be >= 0")
        require(self.prefetch_factor >= 1, "data.prefetch_factor must be >= 1")
        one_of("data.on_error", self.on_error, ("raise", "skip"))
        require(self.in_memory_max_mb >= 0, "data.in_memory_max_mb must be >= 0")
        require(self.shuffle_buffer >= 0, "data.shuffle_buffer must be >= 0")
        require(
            self.window_shards is None or self.window_shards >= 1,
            f"data.window_shards={self.window_shards} must be >= 1 or null",
        )
        require(
            self.num_samples is None or self.num_samples >= 1,
            f"data.num_samples={self.num_samples} must be >= 1 or null",
        )


@dataclass
class BatchConfig:
    global_size: int = MISSING
    """G: samples behind one optimizer update, fixed whatever the world size."""
    micro_size: int = MISSING
    """Samples one process runs forward/backward at once; accumulation is derived."""
    drop_last: bool = MISSING
    """Drop the remainder of N / G, or pad the last global batch with the epoch's first samples."""


@dataclass
class ScheduleConfig:
    name: str = MISSING
    """warmup_cosine | constant | plateau (constant; the plateau tracker lowers it)."""
    warmup_iterations: int = MISSING
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
class TrainerConfig:
    max_epochs: int | None = MISSING
    """null: train until the plateau tracker stops the run."""
    seed: int = MISSING
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
    compile: bool = MISSING
    """torch.compile the model for training (checkpoints hold the plain module's
    weights: they load with or without it)."""
    compile_mode: str | None = MISSING
    """torch.compile's mode: null (default), reduce-overhead, max-autotune, ..."""
    compile_backend: str = MISSING
    """torch.compile's backend: inductor; eager or aot_eager to debug a compiled run."""
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
    checkpoint_every_steps: int | None = MISSING
    checkpoint_every_minutes: float | None = MISSING
    nonfinite: str = MISSING
    """stop | skip: what all ranks do when the loss is not finite on any rank."""
    max_skipped_steps: int = MISSING
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
        require(self.log_every_steps >= 1, "trainer.log_every_steps must be >= 1")
        for key in ("checkpoint_every_steps", "checkpoint_every_minutes", "max_steps"):
            positive_or_none(f"trainer.{key}", getattr(self, key))


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
    mode: str = MISSING
    """offline | online | disabled. Offline by default (clusters rarely reach the
    internet); the environment's WANDB_MODE wins when set."""
    project: str = MISSING
    entity: str | None = MISSING
    name: str | None = MISSING
    """Run name; null: the experiment and its overrides."""
    group: str | None = MISSING
    """Runs of one sweep share a group; null: the Hydra sweep's name."""
    job_type: str = MISSING
    tags: list[str] = MISSING
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
    curves: bool = MISSING
    """Save the learning-curve PNG in the run directory (and log it to W&B)."""


@dataclass
class RunConfig:
    root: str = MISSING
    name: str | None = MISSING
    """Run directory name; null: from SLURM_JOB_ID, then TORCHELASTIC_RUN_ID."""


@dataclass
class Config:
    model: Any = MISSING
    """`_target_` + kwargs of an nn.Module: ours (ddp.models) or the user's."""
    optim: Any = MISSING
    """`_target_` + kwargs of a torch.optim.Optimizer (lr required); params are passed in."""
    data: DataConfig = MISSING
    batch: BatchConfig = MISSING
    schedule: ScheduleConfig = MISSING
    trainer: TrainerConfig = MISSING
    plateau: PlateauConfig = MISSING
    logger: LoggerConfig = MISSING
    run: RunConfig = MISSING
    experiment_name: str = MISSING

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
