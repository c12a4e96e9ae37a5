"""The training job: config -> plan -> process group -> data -> model -> loop -> teardown.

torchrun --standalone --nproc_per_node=2 -m ddp.train experiment=digits
python -m ddp.train trainer.max_epochs=3          # one process
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp import checkpoint, data, dist
from ddp.config import CONF_DIR, Config, ConfigError, register, to_config
from ddp.plan import BatchPlan, PlanError, plan_for
from ddp.plateau import PlateauTracker
from ddp.progress import Progress
from ddp.schedule import LRSchedule, scaled_lr
from ddp.streaming import build_stream_loader, stream_num_samples
from ddp.tracking import Tracker, WandbConfig

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written, run again (requeue) to continue

register()


@dataclass
class Position:
    """Where the run is: what a checkpoint must restore to continue exactly."""

    epoch: int = 0
    step_in_epoch: int = 0
    """Optimizer updates already done in `epoch`."""
    global_step: int = 0
    skipped_steps: int = 0
    micro_batches: int = 0
    """Micro-batches this rank has run: equal on all ranks, or DDP would have hung."""
    epoch_sums: dict[str, float] = field(default_factory=dict)
    """Train loss/accuracy sums of the unfinished epoch over all ranks (the same on every
    rank, so a mid-epoch resume from rank 0's checkpoint reports exactly)."""

    def advance(self, step: int, micro_batches: int, **sums: float) -> None:
        self.global_step += 1
        self.step_in_epoch = step + 1
        self.micro_batches += micro_batches
        for key, value in sums.items():
            self.epoch_sums[key] = self.epoch_sums.get(key, 0.0) + value

    def next_epoch(self) -> None:
        self.epoch, self.step_in_epoch, self.epoch_sums = self.epoch + 1, 0, {}


class StopRequest:
    """SIGTERM / SIGUSR1 (SLURM preemption, torchrun shutdown) set a flag; the loop agrees on it."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None


# --------------------------------------------------------------------------- set-up


def split_dir(config: Config, split: str) -> Path:
    return Path(config.data.root) / split


def build_model(config: Config, env: dist.DistEnv) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The user's module (for eval and checkpoints) and its DDP wrapper (for training)."""
    model = instantiate(config.model)
    if channels_last(config, model):  # before DDP: its buckets follow the parameters' layout
        model = model.to(memory_format=torch.channels_last)
    return wrap_model(model, env)


def channels_last(config: Config, model: torch.nn.Module) -> bool:
    """trainer.channels_last, or (None) whether the model has a 2-D convolution: on CPU
    (oneDNN) a small CNN's step took 0.75x the time (bench/overhead.py)."""
    if config.trainer.channels_last is not None:
        return config.trainer.channels_last
    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def input_mover(device: torch.device, channels_last: bool):
    """Batch -> the batch on `device`, 4-D inputs in the model's memory order."""

    def move(batch: data.Batch) -> data.Batch:
        batch = batch.to(device)
        if channels_last and batch.inputs.dim() == 4:
            batch.inputs = batch.inputs.contiguous(memory_format=torch.channels_last)
        return batch

    return move


def wrap_model(
    model: torch.nn.Module, env: dist.DistEnv
) -> tuple[torch.nn.Module, torch.nn.Module]:
    model = model.to(env.device)
    if not env.distributed:
        return model, model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return model, DDP(model, device_ids=device_ids)


def build_optimizer(config: Config, model: torch.nn.Module, plan: BatchPlan):
    s = config.schedule
    peak = scaled_lr(config.optim["lr"], plan.global_size, s.base_global_size, s.lr_scaling)
    optimizer = instantiate(config.optim, params=model.parameters(), lr=peak)
    total = (
        config.trainer.max_epochs * plan.iterations_per_epoch if config.trainer.max_epochs else None
    )
    schedule = LRSchedule(peak, s.name, s.warmup_iterations, total, s.min_lr_ratio)
    return optimizer, schedule


def autocast_for(config: Config, env: dist.DistEnv):
    precision = config.trainer.precision
    if precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=env.device.type, dtype=dtype)


# --------------------------------------------------------------------------- steps


STEP_DEVICE_SUMS = ("loss", "correct", "count")
STEP_HOST_SUMS = ("skipped", "preempt", "save")
EPOCH_SUMS = ("loss", "correct", "count", "skipped")


def train_step(micro_batches, ddp_model, scaler, autocast, sums: dist.StepSums) -> None:
    """Forward/backward over this rank's micro-batches; DDP syncs gradients only on the last.

    Padding repeats and skipped bad samples (valid=False) add nothing to the gradient, so
    each sample counts once per epoch. This rank's [loss sum, correct, samples] go to
    `sums` before the last backward, whose gradient all-reduce sums them over the ranks
    (the loss may be non-finite: then so is the sum).
    """
    accumulate = len(micro_batches)
    stats = []
    for micro, batch in enumerate(micro_batches):
        last = micro == accumulate - 1
        sync = nullcontext() if last or not isinstance(ddp_model, DDP) else ddp_model.no_sync()
        with sync:
            with autocast():
                logits = ddp_model(batch.inputs)
            losses = F.cross_entropy(logits.float(), batch.targets, reduction="none")
            loss = (losses * batch.valid).sum()
            with torch.no_grad():
                hits = (logits.argmax(dim=1) == batch.targets).logical_and_(batch.valid)
                stats.append(torch.stack([loss, hits.sum(), batch.valid.sum()]))
                if last:
                    sums.set_device(torch.stack(stats).sum(dim=0) if accumulate > 1 else stats[0])
            # Sum over the micro-batch / its size / accumulate: this rank's share of the mean
            # over the global batch; DDP averages the ranks.
            scaler.scale(loss / (len(losses) * accumulate)).backward()


def apply_update(optimizer, scaler, model, grad_clip: float | None) -> None:
    if grad_clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate(model, loader, env: dist.DistEnv, autocast, move) -> dict[str, float]:
    """Loss and accuracy over the whole validation set, reduced exactly across ranks."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss, correct, samples
    for batch in loader:
        batch = move(batch)
        with autocast():
            logits = model(batch.inputs)
        valid = batch.valid
        losses = F.cross_entropy(logits.float(), batch.targets, reduction="none")
        sums[0] += losses[valid].sum().double()
        sums[1] += (logits.argmax(dim=1) == batch.targets)[valid].sum().double()
        sums[2] += valid.sum().double()
    model.train()
    dist.all_reduce_sum(sums, env)
    loss, correct, count = sums.tolist()
    return {"val/loss": loss / count, "val/accuracy": correct / count, "val/samples": count}


# --------------------------------------------------------------------------- checkpoints


def checkpoint_state(
    config_record: dict[str, Any],
    plan: BatchPlan,
    model,
    optimizer,
    scaler,
    plateau,
    pos: Position,
    tracker: Tracker,
    env: dist.DistEnv,
) -> dict[str, Any]:
    gathered = dist.all_gather_bytes(checkpoint.rng_state_bytes(), env)  # every rank's
    rng = [checkpoint.rng_state_from_bytes(b) for b in gathered]  # generators
    return {
        "format": checkpoint.FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "position": asdict(pos),
        "plateau": plateau.state_dict(),
        "rng": rng,
        "plan": plan.as_dict(),
        "config": config_record,
        "wandb_run_id": tracker.run_id,
    }


def config_dict(config: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def restore(state, model, optimizer, scaler, plateau, plan: BatchPlan, env) -> Position:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    plateau.load_state_dict(state["plateau"])
    rngs = state["rng"]
    if len(rngs) == env.world_size:  # elastic resume: same data order, fresh dropout streams
        checkpoint.set_rng_state(rngs[env.rank])
    return Position(**state["position"])


# --------------------------------------------------------------------------- the job


def train(cfg: DictConfig) -> int:
    config = to_config(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    ckpt_dir = run_dir / "checkpoints"

    # Everything a process can check alone is checked before any process group exists,
    # so bad input fails fast with one message instead of a hang or a timeout.
    ranks = dist.detect()
    plan = plan_for(config.batch, ranks["world_size"], train_samples(config))
    train_loader, val_loader = build_loaders(config, plan, ranks["rank"])
    check_run_dir(run_dir)
    if ranks["rank"] == 0 and ckpt_dir.is_dir():
        checkpoint.remove_stale_temporaries(ckpt_dir)
    resumed = load_resume_point(config, plan, ckpt_dir)
    stop = StopRequest()

    env = start_process_group(config)
    # First, so that W&B starts (on a thread) while the model is built.
    config_record = config_dict(config)  # once: it costs tens of ms
    tracker = Tracker(
        run_dir=run_dir,
        config=config_record,
        plan=plan.as_dict(),
        wandb=wandb_config(config),
        resume_run_id=resumed["wandb_run_id"] if resumed else None,
        resume_from_step=resumed["position"]["global_step"] if resumed else None,
        monitor=config.plateau.monitor,
        monitor_mode=config.plateau.mode,
        enabled=env.is_main,
    )
    torch.manual_seed(config.trainer.seed + env.rank)
    model, ddp_model = build_model(config, env)
    optimizer, schedule = build_optimizer(config, model, plan)
    scaler = torch.amp.GradScaler(env.device.type, enabled=config.trainer.precision == "fp16")
    plateau = PlateauTracker(config.plateau)
    autocast = autocast_for(config, env)
    pos = restore(resumed, model, optimizer, scaler, plateau, plan, env) if resumed else Position()
    sums = dist.StepSums(env, ddp_model, STEP_DEVICE_SUMS, STEP_HOST_SUMS)
    move = input_mover(env.device, channels_last(config, model))

    progress = Progress(env.is_main, plan.iterations_per_epoch, plan.global_size)
    progress.print(f"batch plan ({env.world_size} process(es), {env.device.type}):\n{plan.table()}")
    progress.print(f"run directory: {run_dir}")
    if resumed:
        progress.print(
            f"resumed at epoch {pos.epoch} step {pos.step_in_epoch} ({ckpt_dir}/last.pt)"
        )

    writer = checkpoint.BackgroundWriter()

    def save_last(also_best: bool = False, leaving: bool = False) -> None:
        """last.pt (and best.pt, a byte copy) by rank 0, written while training goes on;
        before leaving, every rank waits until it is on disk."""
        state = checkpoint_state(
            config_record, plan, model, optimizer, scaler, plateau, pos, tracker, env
        )
        if env.is_main:
            if checkpoint.has_nonfinite(state["model"]):
                progress.print("warning: not saving last.pt: the weights are not finite")
            else:
                best = (ckpt_dir / "best.pt",) if also_best else ()
                writer.save(state, ckpt_dir / "last.pt", copies=best)
        if leaving:
            writer.wait()
            dist.barrier(env)  # nobody exits (or is killed by torchrun) while rank 0 writes

    auditable = config.trainer.audit_samples and getattr(train_loader, "indexed", True)
    audit = SampleAudit(plan.num_samples if auditable else 0)
    stop_reason = None
    last_save = time.monotonic()
    max_epochs = config.trainer.max_epochs or math.inf
    tracker.ready()  # W&B started during the set-up; a failure to start stops us here
    ddp_model.train()
    while pos.epoch < max_epochs and stop_reason is None:
        epoch = pos.epoch
        progress.start_epoch(epoch, pos.step_in_epoch)
        t0, first_step = time.perf_counter(), pos.step_in_epoch
        micro_batches = iter(train_loader.epoch(epoch, pos.step_in_epoch))
        for step in range(pos.step_in_epoch, plan.iterations_per_epoch):
            lr = plateau.scaled_lr(schedule.lr_at(pos.global_step))
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = [move(next(micro_batches)) for _ in range(plan.accumulate)]
            audit.record(batches)
            # Everything the ranks must share this step (loss, counts, stop and save
            # requests) rides on the step's gradient all-reduce: no collective of its own.
            sums.set_host(
                skipped=sum(b.num_skipped for b in batches),
                preempt=stop.requested,
                save=checkpoint_due(config, pos.global_step + 1, last_save),
            )
            train_step(batches, ddp_model, scaler, autocast, sums)
            totals = sums.result()  # over all ranks
            finite = math.isfinite(totals["loss"])  # false if any rank's loss is not
            if not finite:
                optimizer.zero_grad(set_to_none=True)  # no rank applies a poisoned update
                pos.skipped_steps += 1
                stop_reason = nonfinite_verdict(config, pos, epoch, step, progress)
            else:
                apply_update(optimizer, scaler, model, config.trainer.grad_clip)
            counted = EPOCH_SUMS if finite else ("skipped",)  # a skipped update adds no loss
            pos.advance(step, len(batches), **{k: totals[k] for k in counted})
            train_loss = totals["loss"] / max(totals["count"], 1)
            progress.step(train_loss)
            if pos.global_step % config.trainer.log_every_steps == 0:
                train_metrics = {"train/loss": train_loss, "train/lr": lr}
                tracker.log_train(pos.global_step, train_metrics, epoch=epoch)
            if totals["preempt"]:
                stop_reason = "preempted"
            elif config.trainer.max_steps and pos.global_step >= config.trainer.max_steps:
                stop_reason = "max_steps"
            if stop_reason in ("preempted", "max_steps") or totals["save"]:
                save_last(leaving=stop_reason is not None)
                last_save = time.monotonic()
            if stop_reason:
                break
        progress.end_epoch()
        if stop_reason:
            break

        trained = (plan.iterations_per_epoch - first_step) * plan.global_size
        metrics = finish_epoch(pos, trained / max(time.perf_counter() - t0, 1e-9))
        metrics.update(audit.finish_epoch(env))
        metrics.update(evaluate(model, val_loader, env, autocast, move))
        event = plateau.update(epoch, metrics[config.plateau.monitor])
        tracker.log_val(epoch, pos.global_step, metrics)
        if event is not None:
            tracker.log_event(epoch, event)
        progress.print(epoch_line(epoch, metrics, plateau))
        pos.next_epoch()
        save_last(also_best=plateau.best_epoch == epoch)
        last_save = time.monotonic()
        if dist.any_rank(plateau.stopped, env):  # every rank leaves the loop together
            stop_reason = "plateau"

    writer.wait()  # the last checkpoint is on disk before anyone reports or leaves
    dist.barrier(env)
    stop_reason = stop_reason or "max_epochs"
    exit_code = EXIT_CODES.get(stop_reason, EXIT_OK)
    tracker.summary(
        best_value=plateau.best,
        best_epoch=plateau.best_epoch,
        stop_reason=stop_reason,
        epochs=pos.epoch,
        global_step=pos.global_step,
        skipped_steps=pos.skipped_steps,
        micro_batches_per_rank=dist.all_gather_object(pos.micro_batches, env),
    )
    progress.print(final_line(config, stop_reason, plateau, pos))
    dist.shutdown(env)
    dist.retire(ddp_model)
    # Rank 0 alone from here on: the others may leave (no collective waits on the plot).
    if stop_reason != "preempted":
        tracker.save_curves()
    tracker.finish(exit_code)
    return exit_code


EXIT_CODES = {"preempted": EXIT_PREEMPTED, "nonfinite_loss": EXIT_NONFINITE}


def nonfinite_verdict(config: Config, pos: Position, epoch: int, step: int, progress) -> str | None:
    """Skip the update (up to a limit) or stop; the same answer on every rank."""
    where = f"epoch {epoch} step {step} (global step {pos.global_step})"
    t = config.trainer
    if t.nonfinite == "stop" or pos.skipped_steps > t.max_skipped_steps:
        progress.print(
            f"error: non-finite loss at {where}; stopping (trainer.nonfinite={t.nonfinite})"
        )
        return "nonfinite_loss"
    progress.print(f"warning: non-finite loss at {where}; update skipped ({pos.skipped_steps})")
    return None


def final_line(config: Config, stop_reason: str, plateau: PlateauTracker, pos: Position) -> str:
    best = plateau.best if plateau.best is None else f"{plateau.best:.4f}"
    return (
        f"done ({stop_reason}) after {pos.global_step} iterations; "
        f"best {config.plateau.monitor}={best} at epoch {plateau.best_epoch}"
    )


def train_samples(config: Config) -> int:
    """N, from the manifest (beside the shards, or `data.num_samples` for remote URLs)."""
    d = config.data
    if d.urls:
        return d.num_samples or stream_num_samples(d.urls)
    return data.num_samples(split_dir(config, d.train_split))


def build_loaders(config: Config, plan: BatchPlan, rank: int):
    """Open the shards (a missing or mismatched one fails here, before any collective)."""
    d = config.data
    options = data.LoaderOptions(
        num_workers=d.num_workers,
        pin_memory=d.pin_memory and torch.cuda.is_available() and config.trainer.device != "cpu",
        prefetch_factor=d.prefetch_factor,
        on_error=d.on_error,
        input_key=d.input_key,
        target_key=d.target_key,
        in_memory_max_mb=d.in_memory_max_mb,
    )
    seed = config.trainer.seed
    transform = instantiate(d.transform) if d.transform else None  # per sample, training only
    train_dir = split_dir(config, d.train_split)
    if d.urls:  # streaming: sequential reads, exact batch counts, approximate coverage
        train = build_stream_loader(
            d.urls, plan, rank, seed, options, shuffle_buffer=d.shuffle_buffer, transform=transform
        )
    else:
        train = data.build_train_loader(train_dir, plan, rank, seed, options, transform)
    val_dir = split_dir(config, d.val_split)
    val = data.build_eval_loader(val_dir, plan.micro_size, rank, plan.world_size, options)
    return train, val


def check_run_dir(run_dir: Path, min_free_bytes: int = 64 << 20) -> None:
    """An unwritable or full run directory is reported now, not at the first checkpoint."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"run directory {run_dir} is not writable: {exc.strerror}") from exc
    free = shutil.disk_usage(run_dir).free
    if free < min_free_bytes:
        raise ConfigError(f"run directory {run_dir} has only {free >> 20} MiB free")


def load_resume_point(config: Config, plan: BatchPlan, ckpt_dir: Path) -> dict[str, Any] | None:
    path = ckpt_dir / "last.pt"
    if not config.trainer.resume or not path.exists():
        return None
    state = checkpoint.load(path)
    saved = state["plan"]
    changed = [
        k for k in ("global_size", "num_samples", "drop_last") if saved[k] != getattr(plan, k)
    ]
    if changed and not config.trainer.restart_epoch_on_plan_change:
        key = changed[0]
        raise ConfigError(
            f"cannot resume {path}: {key} was {saved[key]}, now {getattr(plan, key)} "
            "(keep it, use a new run.name, or set trainer.restart_epoch_on_plan_change=true)"
        )
    if changed:  # the saved position means nothing in the new plan: restart the epoch
        state["position"].update(step_in_epoch=0, epoch_sums={})
    return state


def start_process_group(config: Config) -> dist.DistEnv:
    try:
        return dist.init_distributed(config.trainer.device, config.trainer.timeout_s)
    except RuntimeError as exc:  # DistNetworkError & co. carry the store's message
        text = str(exc)
        if "address already in use" in text.lower() or "EADDRINUSE" in text:
            addr = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            raise ConfigError(
                f"MASTER_ADDR:MASTER_PORT={addr} is already in use; pick a free port"
            ) from exc
        raise


class SampleAudit:
    """Counts how often each training sample was used this epoch, over all ranks.

    Opt-in (trainer.audit_samples): one all_reduce of N counters per epoch proves
    the epoch guarantee on the real run: every sample once, plus the padding.
    """

    def __init__(self, num_samples: int) -> None:
        self.counts = torch.zeros(num_samples, dtype=torch.int64)

    def record(self, batches) -> None:
        if len(self.counts):
            for batch in batches:
                self.counts.index_add_(0, batch.indices.cpu(), torch.ones_like(batch.indices.cpu()))

    def finish_epoch(self, env: dist.DistEnv) -> dict[str, float]:
        if not len(self.counts):
            return {}
        counts = dist.all_reduce_sum(self.counts.to(env.device, copy=True), env).cpu()
        self.counts.zero_()
        used = int((counts > 0).sum())
        return {
            "audit/unique_samples": used,
            "audit/missing_samples": len(counts) - used,
            "audit/repeated_samples": int(counts.sum()) - used,
        }


def checkpoint_due(config: Config, next_step: int, last_save: float) -> bool:
    """By steps or by minutes; reduced with any_rank so all ranks save together."""
    t = config.trainer
    by_steps = t.checkpoint_every_steps is not None and next_step % t.checkpoint_every_steps == 0
    by_time = (
        t.checkpoint_every_minutes is not None
        and time.monotonic() - last_save >= 60 * t.checkpoint_every_minutes
    )
    return by_steps or by_time


def finish_epoch(pos: Position, samples_per_s: float) -> dict[str, float]:
    """Train loss and accuracy of the epoch over all ranks (its step sums already are),
    bad samples skipped, throughput."""
    loss, correct, count, skipped = (pos.epoch_sums.get(k, 0.0) for k in EPOCH_SUMS)
    return {
        "train/epoch_loss": loss / max(count, 1),
        "train/epoch_accuracy": correct / max(count, 1),
        "train/samples_per_s": samples_per_s,
        "data/skipped_samples": skipped,
    }


def epoch_line(epoch: int, m: dict[str, float], plateau: PlateauTracker) -> str:
    best = "-" if plateau.best is None else f"{plateau.best:.4f} @ epoch {plateau.best_epoch}"
    return (
        f"epoch {epoch}: train loss {m['train/epoch_loss']:.4f} acc {m['train/epoch_accuracy']:.4f}"
        f" | val loss {m['val/loss']:.4f} acc {m['val/accuracy']:.4f}"
        f" | {m['train/samples_per_s']:,.0f} samples/s | best {best}"
    )


def wandb_config(config: Config) -> WandbConfig:
    """Group = the Hydra sweep; name = the experiment and its overrides (unless set)."""
    w, hc = config.logger.wandb, HydraConfig.get()
    group = w.group or (Path(hc.sweep.dir).name if hc.mode.name == "MULTIRUN" else None)
    overrides = hc.job.override_dirname
    name = w.name or config.experiment_name + (f"-{overrides}" if overrides else "")
    return replace(w, group=group, name=name)


# An absolute path: a console script imports ddp.train as a package module, where a
# relative config_path would be looked up as a Python package named conf.
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_entry(cfg: DictConfig) -> None:
    try:
        code = train(cfg)
    except (ConfigError, PlanError, data.DataError, checkpoint.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        code = EXIT_BAD_INPUT
    if code != EXIT_OK:
        sys.exit(code)  # Hydra returns nothing: the exit code travels as SystemExit


def keep_freed_memory() -> None:
    """Keep freed blocks in glibc's heap instead of handing them back to the OS.

    Above glibc's mmap threshold every step's activations would land on fresh pages
    and be zero-filled again on first touch: 2.7 M page faults and a third of the
    steps/s of a CPU CNN (bench/overhead.py). No-op without glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum
    libc.mallopt(m_trim_threshold, 256 << 20)


def main() -> None:
    keep_freed_memory()
    try:
        _hydra_entry()
        code = EXIT_OK
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    dist.exit_process(code)


if __name__ == "__main__":
    main()
