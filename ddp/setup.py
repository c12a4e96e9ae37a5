"""A training job's start, in the order of the contract (docs/architecture.md):

1. checks, before any process group and before anything is written: the launcher, the
   splits and their labels, the device (and, with batch.micro_size=auto, the micro-batch
   that fits on it), the batch plan, the loaders, the run directory,
   the checkpoint to resume (plan, order, data, model, optimizer), whether the run is
   already finished, and the first step's micro-batches themselves;
2. the process group: every host runs the same job, one job owns the run directory;
3. the objects the loop uses: DDP, the input pipeline, the watch on where the time goes
   (the model's FLOPs counted on the first micro-batch), the tracker (W&B
   starting on a thread), the sample audit and the noise scale's meter, the
   checkpointer, the stepper;
4. the first write to the run: the plan record, once W&B has started.

A refusal anywhere in 1-2 leaves every file of an existing run byte-identical.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ddp import checkpoint
from ddp.audit import SampleAudit
from ddp.build import (
    autocast_for,
    build_loaders,
    build_training,
    input_pipeline,
    set_numerics,
    step_lag,
    wandb_config,
    wrap_ddp,
)
from ddp.checkpointer import Checkpointer
from ddp.compose import as_record
from ddp.config import Config
from ddp.data.batch import Batch, TrainBatches
from ddp.data.device import InputPipeline
from ddp.data.identity import data_identity
from ddp.data.loaders import EvalLoader
from ddp.data.splits import Splits, open_splits
from ddp.distributed.agreement import check_same_job
from ddp.distributed.env import Launch, detect
from ddp.distributed.group import DistEnv, init_distributed, pick_device
from ddp.micro_size import check_auto, find_micro_size
from ddp.noise_meter import NOT_MEASURED, NoiseMeter, meter_for
from ddp.perf.memory import start_snapshot
from ddp.perf.watch import Watch, watch_for
from ddp.plan import BatchPlan, plan_for
from ddp.progress import Progress, start_lines
from ddp.resume import finished, load_resume_point, order_of
from ddp.run_dir import RunLock, check_writable
from ddp.schedule import LRSchedule
from ddp.state import Position, StopRequest, Training, claim_run_dir
from ddp.step import Stepper
from ddp.tracking.tracker import Tracker


@dataclass
class Job:
    """Everything the training loop uses, checked and set up by `start`."""

    plan: BatchPlan
    env: DistEnv
    pos: Position
    """Where the run continues (a new run: epoch 0, step 0)."""
    training: Training
    schedule: LRSchedule
    train_loader: TrainBatches
    val_loader: EvalLoader
    opened: Iterator[Batch]
    """The first epoch's micro-batches, the first step's read already."""
    pipeline: InputPipeline
    autocast: Callable[[], Any]
    stepper: Stepper
    audit: SampleAudit
    noise: NoiseMeter | None
    checkpoints: Checkpointer
    tracker: Tracker
    progress: Progress
    stop: StopRequest
    lock: RunLock | None
    watch: Watch
    """Where the time goes: the step's parts, traces on request, memory, FLOPs."""


def start(
    config: Config, run_dir: Path, sweep_dir: Path | None = None, overrides: list[str] = ()
) -> Job | None:
    """The job, ready for its first step; None when the run is finished and this config
    asks nothing more of it (said in one line, nothing touched). Bad input raises a
    BadInput (ddp.errors) before anything is written."""
    # Everything that can be checked is checked before any process group exists and
    # before anything is written: a refused start leaves every file of a run as it was.
    launch = detect()
    num_classes = config.model.get("num_classes")  # checked against the labels, if given
    splits = open_splits(config.data, num_classes=num_classes)  # each manifest read once
    device = pick_device(config.trainer.device, launch, config.trainer.backend)
    set_numerics(config, device)
    start_snapshot(config.trainer.memory_snapshot, device)  # CUDA allocations, from here
    if check_auto(config, device):  # batch.micro_size=auto: what fits, on every rank
        config, said = fit_micro_size(config, launch, splits, device)
        if launch.rank == 0:
            print(said, flush=True)
    plan = plan_for(config.batch, launch.world_size, splits.num_train_samples)
    train_loader, val_loader = build_loaders(config, plan, launch.rank, splits, device)
    check_writable(run_dir)
    config_record = as_record(config)  # once: it costs tens of ms
    data = data_identity(splits)
    resumed = load_resume_point(run_dir, config.trainer, plan, order_of(config_record), data)
    done = finished(resumed, config.trainer, config_record["plateau"]) if resumed else None
    torch.manual_seed(config.trainer.seed + launch.rank)
    training, schedule = build_training(config, plan, device)
    pos = training.restore(resumed, launch.rank, launch.world_size) if resumed else Position()
    if done:  # run again with nothing more asked of it: say so, touch nothing
        if launch.rank == 0:
            print(f"{run_dir}: this run is finished ({done}); nothing to do", flush=True)
        return None
    # The first step's micro-batches, read now: a shard that cannot be fetched, decoded or
    # cached is refused here too.
    ahead, opened = read_ahead(train_loader.epoch(pos.epoch, pos.step_in_epoch), plan.accumulate)

    # The process group; from here on every rank takes part in each decision.
    default_stop_signals()  # blocked in the rendezvous, a signal must still end us at once
    env = init_distributed(launch, device, config.trainer.timeout_s, config.trainer.backend)
    check_same_job(env, config_record, run_dir)  # every host: same code, config, run dir
    lock = claim_run_dir(run_dir, env)  # one job per run directory, from here to the exit
    stop = StopRequest()
    t = config.trainer
    wrap_ddp(training, env, t.compile)
    pipeline = input_pipeline(config, training.model, device)  # uint8 -> float on the device
    # Where the time goes: the step's parts, traces, memory; the model's FLOPs per sample.
    # (the FLOPs are counted on the first micro-batch; none left: resumed at an epoch's end)
    counted = ahead and t.count_flops
    model_input = pipeline(ahead[0]).inputs if counted else None
    held = train_loader.memory is not None
    watch, perf_notes = watch_for(config, env, run_dir, training.model, model_input, held)
    del model_input
    tracker = Tracker.start(  # W&B starts on a thread while the rest is set up
        run_dir,
        config_record,
        {**plan.as_dict(), "data": data, **watch.plan_record()},
        wandb_config(config, sweep_dir, overrides),
        main=env.is_main,
        resume_run_id=resumed["wandb_run_id"] if resumed else None,
        resume_from_step=pos.global_step if resumed else None,
        monitor=config.plateau.monitor,
        monitor_mode=config.plateau.mode,
    )
    auditable = config.trainer.audit_samples and train_loader.indexed
    audit = SampleAudit(plan.num_samples if auditable else 0)
    noise, unmeasured = noise_meter(config, plan, env)  # the gradient noise scale, per epoch
    counters = {"audit": audit, "noise": noise}  # per-epoch sums a checkpoint carries
    for counter in filter(None, counters.values()):
        counter.resume(resumed, env)  # a resumed epoch's sums so far
    checkpoints = Checkpointer(
        run_dir / "checkpoints", t.checkpoint, config_record, plan, data, training, env,
        tracker.run_id, counters,
    )  # fmt: skip
    autocast = autocast_for(config, device)
    lag = step_lag(config, training, device)  # on a GPU, read a step's totals a step late
    stepper = Stepper(training, env, autocast, config.trainer.grad_clip, lag, noise)
    stepper.sums.on_bucket = watch.grads_ready  # the hook splits compute from communication
    progress = Progress(
        env.is_main, plan.iterations_per_epoch, plan.global_size, config.trainer.progress
    )
    progress.print(start_lines(plan, env, run_dir, resumed, pos))
    for note in filter(None, [unmeasured, *perf_notes]):
        progress.print(note)
    tracker.ready()  # the first write to the run (W&B failing to start stops us before it)
    if env.is_main:
        checkpoint.remove_stale_temporaries(run_dir / "checkpoints")
    return Job(
        plan=plan,
        env=env,
        pos=pos,
        training=training,
        schedule=schedule,
        train_loader=train_loader,
        val_loader=val_loader,
        opened=opened,
        pipeline=pipeline,
        autocast=autocast,
        stepper=stepper,
        audit=audit,
        noise=noise,
        checkpoints=checkpoints,
        tracker=tracker,
        progress=progress,
        stop=stop,
        lock=lock,
        watch=watch,
    )


def fit_micro_size(
    config: Config, launch: Launch, splits: Splits, device: torch.device
) -> tuple[Config, str]:
    """batch.micro_size=auto: trial steps of the run's own model and optimizer on copies of
    its first training sample, as the input pipeline makes it (ddp.micro_size)."""
    one = replace(config, batch=replace(config.batch, micro_size=1))
    plan = plan_for(one.batch, launch.world_size, splits.num_train_samples)
    loader, _ = build_loaders(one, plan, launch.rank, splits, device)
    first = next(iter(loader.epoch(0)))
    sample = input_pipeline(one, build_training(one, plan, device)[0].model, device)(first)
    del loader

    def build(size: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        training = build_training(one, plan, device)[0]
        return training.model, training.optimizer

    inputs = (sample.inputs, sample.targets)
    return find_micro_size(config, launch, device, inputs, build, autocast_for(config, device))


def noise_meter(config: Config, plan: BatchPlan, env: DistEnv) -> tuple[NoiseMeter | None, str]:
    """trainer.noise_scale's meter, or None and the line that says why it is not measured."""
    if not config.trainer.noise_scale:
        return None, ""
    if config.trainer.precision == "fp16":  # scaled gradients, and a scale that moves
        return None, "noise scale: not measured with trainer.precision=fp16"
    meter = meter_for(
        plan.micro_size, plan.accumulate, env.world_size, plan.num_samples, env.device
    )
    return meter, NOT_MEASURED if meter is None else ""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
"""What ddp.cli handles during the checks, and what the rendezvous leaves to the default."""


def default_stop_signals() -> None:
    """STOP_SIGNALS back to their default action where ddp.cli handled them during the
    checks (StopRequest takes them over once the process group exists)."""
    for sig in STOP_SIGNALS:
        if callable(signal.getsignal(sig)):  # a Python handler (ignored stays ignored)
            signal.signal(sig, signal.SIG_DFL)


def read_ahead(batches: Iterator[Batch], count: int) -> tuple[list[Batch], Iterator[Batch]]:
    """The first `count` of `batches`, read now (raising what reading them raises), and
    all of `batches` from the first."""
    ahead = list(itertools.islice(batches, count))
    return ahead, itertools.chain(ahead, batches)
