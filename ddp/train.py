"""The training job: config -> plan -> checks -> process group -> loop -> teardown.

    torchrun --standalone --nproc_per_node=2 -m ddp.train experiment=digits
    python -m ddp.train trainer.max_epochs=3          # one process

Vocabulary (docs/architecture.md): an epoch uses every training sample once; a step
(iteration) is one optimizer update over a global batch of `plan.global_size` samples,
which each rank runs as `plan.accumulate` micro-batches of `plan.micro_size`.
"""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Iterator
from pathlib import Path

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
from ddp.config import Config, TrainerConfig
from ddp.data.batch import Batch
from ddp.data.device import Prefetcher
from ddp.data.identity import data_identity
from ddp.data.splits import open_splits
from ddp.distributed import collectives
from ddp.distributed.agreement import check_same_job
from ddp.distributed.env import detect
from ddp.distributed.exit import ExitCode, retire
from ddp.distributed.group import DistEnv, init_distributed, pick_device, shutdown
from ddp.noise_meter import NOT_MEASURED, NoiseMeter, meter_for
from ddp.plan import BatchPlan, plan_for
from ddp.progress import Progress, epoch_line, final_line, start_lines
from ddp.resume import finished, load_resume_point, order_of
from ddp.run_dir import check_writable
from ddp.state import Position, StopRequest, claim_run_dir
from ddp.step import Stepper, StepTotals, epoch_metrics, evaluate
from ddp.tracking.tracker import Tracker


def train(
    config: Config, run_dir: Path, sweep_dir: Path | None = None, overrides: list[str] = ()
) -> int:
    # Everything that can be checked is checked before any process group exists and
    # before anything is written: a refused start leaves every file of a run as it was.
    launch = detect()
    num_classes = config.model.get("num_classes")  # checked against the labels, if given
    splits = open_splits(config.data, num_classes=num_classes)  # each manifest read once
    plan = plan_for(config.batch, launch.world_size, splits.num_train_samples)
    device = pick_device(config.trainer.device, launch, config.trainer.backend)
    set_numerics(config, device)
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
        return ExitCode.OK
    # The first step's micro-batches, read now: a shard that cannot be fetched, decoded or
    # cached is refused here too.
    opened = read_ahead(train_loader.epoch(pos.epoch, pos.step_in_epoch), plan.accumulate)

    default_stop_signals()  # blocked in the rendezvous, a signal must still end us at once
    env = init_distributed(launch, device, config.trainer.timeout_s, config.trainer.backend)
    check_same_job(env, config_record, run_dir)  # every host: same code, config, run dir
    lock = claim_run_dir(run_dir, env)  # one job per run directory, from here to the exit
    stop = StopRequest()
    t = config.trainer
    wrap_ddp(training, env, t.compile)
    tracker = Tracker.start(  # W&B starts on a thread while the rest is set up
        run_dir,
        config_record,
        {**plan.as_dict(), "data": data},
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
    pipeline = input_pipeline(config, training.model, device)  # uint8 -> float on the device
    plateau = training.plateau
    progress = Progress(
        env.is_main, plan.iterations_per_epoch, plan.global_size, config.trainer.progress
    )
    progress.print(start_lines(plan, env, run_dir, resumed, pos))
    if unmeasured:
        progress.print(unmeasured)
    tracker.ready()  # the first write to the run (W&B failing to start stops us before it)
    if env.is_main:
        checkpoint.remove_stale_temporaries(run_dir / "checkpoints")

    reason: str | None = None
    training.ddp_model.train()
    for epoch in pos.epochs(t.max_epochs):
        progress.start_epoch(epoch, pos.step_in_epoch)
        t0, first_step = time.perf_counter(), pos.step_in_epoch
        batches = Prefetcher(opened or train_loader.epoch(epoch, pos.step_in_epoch), pipeline)
        opened = None
        for step in range(pos.step_in_epoch, plan.iterations_per_epoch):
            micro_batches = [next(batches) for _ in range(plan.accumulate)]
            audit.record(micro_batches)
            queued = pos.global_step + stepper.in_flight  # steps before this one
            lr = plateau.scaled_lr(schedule.lr_at(queued))
            # What the ranks must share this step rides on its gradient all-reduce.
            stepper.begin(
                step,
                lr,
                skipped=sum(b.num_skipped for b in micro_batches),
                preempt=stop.preempt,
                interrupt=stop.interrupt,
                save=checkpoints.due(queued + 1),
                failed=io_failure(tracker, checkpoints) is not None,
            )
            for micro, batch in enumerate(micro_batches):
                stepper.forward_backward(batch, plan.accumulate, last=micro == plan.accumulate - 1)
            stepper.finish()  # the update, or (loss not finite on some rank) none
            last = step == plan.iterations_per_epoch - 1
            # Steps whose totals are read now: this one, or (on a GPU) the one before.
            reason, save = book(stepper.results(drain=last), pos, epoch, t, tracker, progress)
            if t.max_steps and pos.global_step + stepper.in_flight >= t.max_steps:
                reason = reason or "max_steps"
            if reason or save:  # a stop or a checkpoint accounts for every step queued
                reason = reason or book(stepper.results(True), pos, epoch, t, tracker, progress)[0]
                if reason in SAVED_ON_STOP or save:
                    checkpoints.save(pos, leaving=reason is not None)
            if reason:
                break
        progress.end_epoch()
        if reason:
            break

        trained = (plan.iterations_per_epoch - first_step) * plan.global_size
        metrics = epoch_metrics(pos, trained / max(time.perf_counter() - t0, 1e-9))
        metrics.update(audit.finish_epoch(env))
        if noise is not None and (found := noise.finish_epoch(env)):
            metrics.update(found.as_metrics())
        metrics.update(evaluate(training.model, val_loader, env, autocast, pipeline))
        event = plateau.update(epoch, metrics[config.plateau.monitor])
        tracker.log_val(epoch, pos.global_step, metrics)
        if event is not None:
            tracker.log_event(epoch, event)
        progress.print(epoch_line(epoch, metrics, plateau, plan.global_size))
        pos.next_epoch()
        checkpoints.save(pos, best=plateau.best_epoch == epoch)
        if collectives.any_rank(plateau.stopped, env):  # every rank leaves the loop together
            reason = "plateau"
            break

    checkpoints.close()  # the last checkpoint is on disk before anyone reports or leaves
    failure = io_failure(tracker, checkpoints)
    if collectives.any_rank(failure is not None, env):  # e.g. the last write met a full disk
        reason = "io_error"
        progress.error(f"{failure}; stopping (the last good checkpoint is kept)")
    reason = reason or "max_epochs"
    exit_code = EXIT_CODES.get(reason, ExitCode.OK)
    tracker.summary(
        best_value=plateau.best,
        best_epoch=plateau.best_epoch,
        stop_reason=reason,
        epochs=pos.epoch,
        global_step=pos.global_step,
        skipped_steps=pos.skipped_steps,
        micro_batches_per_rank=collectives.all_gather_object(pos.micro_batches, env),
    )
    progress.print(final_line(reason, plateau, pos.global_step))
    shutdown(env)
    retire(training.ddp_model)
    # Rank 0 alone from here on: the others may leave (no collective waits on the plot).
    if reason not in SAVED_ON_STOP + ("io_error",) and config.logger.curves:
        tracker.save_curves()
    tracker.finish(exit_code)
    if lock is not None:
        lock.release()
    return exit_code


SAVED_ON_STOP = ("preempted", "interrupted", "max_steps")
"""Stops that checkpoint first (a non-finite loss or a failed write keeps the last good one)."""
EXIT_CODES = {
    "preempted": ExitCode.PREEMPTED,
    "interrupted": ExitCode.INTERRUPTED,
    "nonfinite_loss": ExitCode.NONFINITE,
    "io_error": ExitCode.BAD_INPUT,
}


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


def default_stop_signals() -> None:
    """SIGTERM and SIGHUP back to their default action where ddp.cli handled them during
    the checks (StopRequest takes them over once the process group exists)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if callable(signal.getsignal(sig)):  # a Python handler (ignored stays ignored)
            signal.signal(sig, signal.SIG_DFL)


def read_ahead(batches: Iterator[Batch], count: int) -> Iterator[Batch]:
    """`batches`, whose first `count` are read already (raising what reading them raises)."""
    return itertools.chain(list(itertools.islice(batches, count)), batches)


def io_failure(tracker: Tracker, checkpoints: Checkpointer) -> str | None:
    """What this rank could not write (metrics.jsonl or a checkpoint), if anything."""
    return tracker.failure or checkpoints.failure


def book(
    done: list[StepTotals],
    pos: Position,
    epoch: int,
    t: TrainerConfig,
    tracker: Tracker,
    progress: Progress,
) -> tuple[str | None, bool]:
    """Account for steps whose totals were read: advance the position, show and log the
    loss. Returns the first reason to stop among them and whether one asked for a
    checkpoint: the same on every rank, since the totals are sums over all ranks."""
    reason, save = None, False
    for totals in done:
        pos.advance(totals.step, totals.micro_batches, totals.epoch_sums(), updated=totals.finite)
        progress.step(totals.mean_loss)
        if pos.global_step % t.log_every_steps == 0:
            metrics = {"train/loss": totals.mean_loss, "train/lr": totals.lr}
            tracker.log_train(pos.global_step, metrics, epoch=epoch)
        reason = reason or stop_decision(t, totals, pos, epoch, progress)
        save = save or totals.save > 0
    return reason, save


def stop_decision(
    t: TrainerConfig, totals: StepTotals, pos: Position, epoch: int, progress: Progress
) -> str | None:
    """Why the run stops after this step, or None."""
    if totals.failed:
        return "io_error"
    if totals.interrupt:
        return "interrupted"
    if totals.preempt:
        return "preempted"
    if not totals.finite:
        where = f"epoch {epoch} step {totals.step} (global step {pos.global_step})"
        if t.nonfinite == "stop" or pos.skipped_steps > t.max_skipped_steps:
            progress.print(
                f"error: non-finite loss at {where}; stopping (trainer.nonfinite={t.nonfinite})"
            )
            return "nonfinite_loss"
        progress.print(f"warning: non-finite loss at {where}; update skipped ({pos.skipped_steps})")
    return None


if __name__ == "__main__":  # python -m ddp.train ...: the same command as ddp-train
    from ddp.cli import main

    main()
