"""Rank-0 console output: the progress bar and the one-line messages of a run."""

from __future__ import annotations

import math
import sys
import time

from tqdm import tqdm

from ddp.plateau import PlateauTracker


class Progress:
    """A tqdm bar per epoch on the main rank (with trainer.progress, when stderr is a
    terminal), and its one-line messages; silent elsewhere."""

    def __init__(
        self, enabled: bool, iterations_per_epoch: int, global_size: int, bar: bool = True
    ) -> None:
        self.enabled = enabled
        self.bar = bar
        self.iterations = iterations_per_epoch
        self.global_size = global_size
        self._bar: tqdm | None = None
        self._t0 = 0.0
        self._steps = 0

    def start_epoch(self, epoch: int, first_step: int) -> None:
        if not (self.enabled and self.bar):
            return
        self._bar = tqdm(
            total=self.iterations,
            initial=first_step,
            desc=f"epoch {epoch}",
            unit="it",
            dynamic_ncols=True,
            leave=False,
            file=sys.stderr,
            disable=None,  # no bar when stderr is not a terminal (logs, CI)
        )
        self._t0 = time.perf_counter()
        self._steps = 0

    def step(self, loss: float) -> None:
        if self._bar is None:
            return
        self._steps += 1
        rate = self._steps * self.global_size / max(time.perf_counter() - self._t0, 1e-9)
        self._bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:,.0f}", refresh=False)
        self._bar.update()

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def error(self, message: str) -> None:
        """One `error: ...` line on stderr, as a refusal at start-up reads."""
        if self.enabled:
            print(f"error: {message}", file=sys.stderr, flush=True)


def start_lines(plan, env, run_dir, resumed: dict | None, pos) -> str:
    """The plan, then where the run lives and whether it starts or continues (and what
    a resume had to assume, if anything)."""
    table = f"batch plan ({env.world_size} process(es), {env.device.type}):\n{plan.table()}"
    if resumed:
        where = f"continuing at epoch {pos.epoch} step {pos.step_in_epoch} from {resumed['path']}"
    else:
        where = "new run"
    note = f"\nnote: {resumed['note']}" if resumed and resumed.get("note") else ""
    return f"{table}\nrun directory: {run_dir} ({where}){note}"


def epoch_line(
    epoch: int, m: dict[str, float], plateau: PlateauTracker, global_size: int | None = None
) -> str:
    best = "-" if plateau.best is None else f"{plateau.best:.4f} @ epoch {plateau.best_epoch}"
    noise = ""
    if "batch/noise_scale" in m:  # NaN: an estimate came out negative, too noisy to tell
        value = m["batch/noise_scale"]
        shown = "too noisy to tell" if math.isnan(value) else f"{value:,.0f}"
        noise = f" | noise scale {shown} (global batch {global_size})"
    data = f" | data {m['time/data']:.0%}" if "time/data" in m else ""  # waiting for it
    return (
        f"epoch {epoch}: train loss {m['train/epoch_loss']:.4f} acc {m['train/epoch_accuracy']:.4f}"
        f" | val loss {m['val/loss']:.4f} acc {m['val/accuracy']:.4f}"
        f" | {m['train/samples_per_s']:,.0f} samples/s{data}{noise} | best {best}"
    )


def final_line(stop_reason: str, plateau: PlateauTracker, global_step: int) -> str:
    done = f"done ({stop_reason}) after {global_step} iterations; "
    monitor, warmup = plateau.config.monitor, plateau.config.warmup_epochs
    if plateau.best is None:  # no best.pt either
        return done + f"no best {monitor} yet (the first {warmup} epochs are plateau.warmup_epochs)"
    return done + f"best {monitor}={plateau.best:.4f} at epoch {plateau.best_epoch}"
