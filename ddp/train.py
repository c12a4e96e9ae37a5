"""The training job: its start (ddp.setup: config -> plan -> checks -> process group), the
loop over epochs, steps and micro-batches, and the teardown.

    torchrun --standalone --nproc_per_node=2 -m ddp.train experiment=digits
    python -m ddp.train trainer.max_epochs=3          # one process

Vocabulary (docs/architecture.md): an epoch uses every training sample once; a step
(iteration) is one optimizer update over a global batch of `plan.global_size` samples,
which each rank runs as `plan.accumulate` micro-batches of `plan.micro_size`.
"""

from __future__ import annotations

import time
from pathlib import Path

from ddp.checkpointer import Checkpointer
from ddp.config import Config, TrainerConfig
from ddp.data.device import Prefetcher
from ddp.distributed import collectives
from ddp.distributed.exit import ExitCode, retire
from ddp.distributed.group import shutdown
from ddp.perf.memory import out_of_memory
from ddp.progress import Progress, epoch_line, final_line
from ddp.setup import Job, start
from ddp.state import Position
from ddp.step import StepTotals, epoch_metrics, evaluate
from ddp.tracking.tracker import Tracker


def train(
    config: Config, run_dir: Path, sweep_dir: Path | None = None, overrides: list[str] = ()
) -> int:
    job = start(config, run_dir, sweep_dir, overrides)  # checks, process group, first write
    if job is None:  # run again with nothing more asked of it: said, nothing touched
        return ExitCode.OK
    t, plan, env, pos = config.trainer, job.plan, job.env, job.pos
    training, plateau, tracker = job.training, job.training.plateau, job.tracker
    checkpoints, progress = job.checkpoints, job.progress
    with out_of_memory(run_dir, plan.micro_size, env.rank, t.memory_snapshot):
        reason = run_epochs(job, config)
    job.watch.close()  # a trace whose window the run ended in
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
    if job.lock is not None:
        job.lock.release()
    return exit_code


def run_epochs(job: Job, config: Config) -> str | None:
    """Epochs until one of them stops the run: returns why (None: max_epochs reached)."""
    t, plan, env, pos = config.trainer, job.plan, job.env, job.pos
    training, plateau, stepper = job.training, job.training.plateau, job.stepper
    tracker, checkpoints, progress = job.tracker, job.checkpoints, job.progress
    audit, noise, stop, opened, watch = job.audit, job.noise, job.stop, job.opened, job.watch
    training.ddp_model.train()
    watch.timer.restart()  # the start-up is no epoch's time
    for epoch in pos.epochs(t.max_epochs):
        progress.start_epoch(epoch, pos.step_in_epoch)
        t0, first_step = time.perf_counter(), pos.step_in_epoch
        batches = Prefetcher(
            opened or job.train_loader.epoch(epoch, pos.step_in_epoch), job.pipeline
        )
        opened, reason = None, None
        for step in range(pos.step_in_epoch, plan.iterations_per_epoch):
            queued = pos.global_step + stepper.in_flight  # steps before this one
            watch.begin_step(queued + 1)
            with watch.part("data"):
                micro_batches = [next(batches) for _ in range(plan.accumulate)]
            audit.record(micro_batches)
            lr = plateau.scaled_lr(job.schedule.lr_at(queued))
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
            with watch.part("forward_backward"):
                for micro, batch in enumerate(micro_batches):
                    synced = micro == plan.accumulate - 1  # DDP's all-reduce: the last only
                    stepper.forward_backward(batch, plan.accumulate, last=synced)
            with watch.part("optimizer"):
                stepper.finish()  # the update, or (loss not finite on some rank) none
            watch.end_step()
            if watch.uncounted is not None and (said := watch.count_flops(micro_batches[0].inputs)):
                progress.print(said)  # (resumed where an epoch had no step left: counted now)
            last = step == plan.iterations_per_epoch - 1
            # Steps whose totals are read now: this one, or (on a GPU) the one before.
            reason, save = book(stepper.results(drain=last), job, epoch, t)
            if t.max_steps and pos.global_step + stepper.in_flight >= t.max_steps:
                reason = reason or "max_steps"
            if reason or save:  # a stop or a checkpoint accounts for every step queued
                reason = reason or book(stepper.results(True), job, epoch, t)[0]
                if reason in SAVED_ON_STOP or save:
                    with watch.label("checkpoint"):
                        checkpoints.save(pos, leaving=reason is not None)
            if reason:
                break
        progress.end_epoch()
        if reason:
            return reason

        trained = (plan.iterations_per_epoch - first_step) * plan.global_size
        metrics = epoch_metrics(pos, trained / max(time.perf_counter() - t0, 1e-9))
        metrics.update(audit.finish_epoch(env))
        if noise is not None and (found := noise.finish_epoch(env)):
            metrics.update(found.as_metrics())
        metrics.update(evaluate(training.model, job.val_loader, env, job.autocast, job.pipeline))
        metrics.update(watch.epoch_metrics(metrics["train/samples_per_s"]))  # collective
        event = plateau.update(epoch, metrics[config.plateau.monitor])
        tracker.log_val(epoch, pos.global_step, metrics)
        if event is not None:
            tracker.log_event(epoch, event)
        progress.print(epoch_line(epoch, metrics, plateau, plan.global_size))
        if line := watch.bottleneck_line(epoch, metrics):
            progress.print(line)
        pos.next_epoch()
        with watch.label("checkpoint"):
            checkpoints.save(pos, best=plateau.best_epoch == epoch)
        if collectives.any_rank(plateau.stopped, env):  # every rank leaves the loop together
            return "plateau"
    return None


SAVED_ON_STOP = ("preempted", "interrupted", "max_steps")
"""Stops that checkpoint first (a non-finite loss or a failed write keeps the last good one)."""
EXIT_CODES = {
    "preempted": ExitCode.PREEMPTED,
    "interrupted": ExitCode.INTERRUPTED,
    "nonfinite_loss": ExitCode.NONFINITE,
    "io_error": ExitCode.BAD_INPUT,
}


def io_failure(tracker: Tracker, checkpoints: Checkpointer) -> str | None:
    """What this rank could not write (metrics.jsonl or a checkpoint), if anything."""
    return tracker.failure or checkpoints.failure


def book(done: list[StepTotals], job: Job, epoch: int, t: TrainerConfig) -> tuple[str | None, bool]:
    """Account for steps whose totals were read: advance the position, show and log the
    loss (and where the time went since the last log). Returns the first reason to stop
    among them and whether one asked for a checkpoint: the same on every rank, since the
    totals are sums over all ranks."""
    pos, progress = job.pos, job.progress
    reason, save = None, False
    for totals in done:
        pos.advance(totals.step, totals.micro_batches, totals.epoch_sums(), updated=totals.finite)
        progress.step(totals.mean_loss)
        if pos.global_step % t.log_every_steps == 0:
            metrics = {"train/loss": totals.mean_loss, "train/lr": totals.lr}
            metrics.update(job.watch.interval_metrics())  # this rank's
            job.tracker.log_train(pos.global_step, metrics, epoch=epoch)
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
