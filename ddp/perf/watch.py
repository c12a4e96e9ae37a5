"""The training loop's one handle on where the time goes (docs/performance.md).

Every step is marked into parts (ddp.perf.timing) and, inside a `trainer.profile`
window, labelled in a torch.profiler trace with the same names (ddp.perf.trace). At
each epoch's end the ranks' breakdowns are averaged, the peak memory is the most any
rank used (ddp.perf.memory), and the achieved TFLOPS and MFU follow from the epoch's
throughput (ddp.perf.flops).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ddp.config import Config
from ddp.data.remote import is_remote
from ddp.distributed import collectives
from ddp.distributed.group import DistEnv
from ddp.perf.flops import count_flops_per_sample, peak_tflops, perf_metrics
from ddp.perf.memory import peak_memory
from ddp.perf.timing import PARTS, Breakdown, StepTimer
from ddp.perf.trace import StepTrace

DATA_BOUND = 0.10
"""An epoch that waits for data more than this fraction of its time gets the line."""


class Watch:
    """Marks, labels and per-epoch figures of a run's steps."""

    def __init__(
        self,
        timer: StepTimer,
        trace: StepTrace,
        env: DistEnv,
        flops_per_sample: float | None = None,
        peak_tflops: float | None = None,
        knobs: list[str] = (),
    ) -> None:
        self.timer, self.trace, self.env = timer, trace, env
        self.flops_per_sample, self.peak_tflops = flops_per_sample, peak_tflops
        self.knobs = list(knobs)
        """What helps this run's loader when the data is the bottleneck."""
        self._said_bottleneck = False
        self._parts = {name: _Part(self, name) for name in STEP_PARTS}
        self.uncounted: torch.nn.Module | None = None
        """The model whose FLOPs are still to be counted (on a micro-batch: count_flops)."""

    def count_flops(self, inputs: torch.Tensor) -> str | None:
        """Count the FLOPs of `uncounted` on `inputs` (a micro-batch as the model sees it);
        the line to say when they cannot be counted."""
        model, self.uncounted = self.uncounted, None
        try:
            self.flops_per_sample = count_flops_per_sample(model, inputs)
        except Exception as exc:  # noqa: BLE001 - whatever the user's forward raises
            reason = " ".join(str(exc).split()) or type(exc).__name__
            return f"note: the model's FLOPs cannot be counted ({reason}); no perf/tflops"
        return None

    def plan_record(self) -> dict[str, float | None]:
        """What the plan record holds of it: the FLOPs per sample and the peak used."""
        return {
            "perf/flops_per_sample": self.flops_per_sample,
            "perf/peak_tflops": self.peak_tflops,
        }

    def begin_step(self, number: int) -> None:
        """Global step `number` (from 1) starts."""
        self.trace.step_begins(number)
        self.timer.mark("start")

    def part(self, name: str) -> _Part:
        """A part of the step (data, forward_backward, optimizer): labelled, then marked."""
        return self._parts[name]

    def label(self, name: str) -> contextlib.AbstractContextManager:
        """A labelled range in the trace that is not a part of the step (checkpoint)."""
        return self.trace.label(name)

    def grads_ready(self) -> None:
        """The communication hook has a bucket of gradients (the last call: all of them)."""
        self.timer.mark("grads_ready")

    def end_step(self) -> None:
        self.timer.end_step()

    def interval_metrics(self) -> dict[str, float]:
        """This rank's breakdown since the last call, as train/time/* (the train records
        and W&B, against the global step; the epoch's are time/*, against the epoch)."""
        return self.timer.interval().as_metrics("train/time/")

    def epoch_metrics(self, samples_per_s: float) -> dict[str, float]:
        """The epoch's breakdown averaged over the ranks, the peak memory over the ranks,
        achieved TFLOPS and MFU. Collective."""
        own = self.timer.epoch()
        device = self.env.device
        times = torch.tensor([*(own.seconds[p] for p in PARTS), own.wall], dtype=torch.float64)
        times = collectives.all_reduce_sum(times.to(device), self.env).cpu() / self.env.world_size
        mean = Breakdown(dict(zip(PARTS, times[:-1].tolist(), strict=True)), times[-1].item())
        memory = peak_memory(device)
        peaks = torch.tensor(list(memory.values()), dtype=torch.float64, device=device)
        peaks = collectives.all_reduce_max(peaks, self.env).cpu().tolist()
        world = self.env.world_size
        perf = perf_metrics(self.flops_per_sample, samples_per_s, world, self.peak_tflops)
        return {**mean.as_metrics(), **dict(zip(memory, peaks, strict=True)), **perf}

    def bottleneck_line(self, epoch: int, metrics: dict[str, float]) -> str | None:
        """Once per run: the line for an epoch that waited for data over DATA_BOUND."""
        waited = metrics.get("time/data", 0.0)
        if self._said_bottleneck or waited <= DATA_BOUND:
            return None
        self._said_bottleneck = True
        return (
            f"note: epoch {epoch} waited for data {waited:.0%} of its time; what helps this "
            f"run's loader: {', '.join(self.knobs)} (docs/performance.md)"
        )

    def close(self) -> None:
        """The trace of a window the run ended in, written."""
        self.trace.close()


STEP_PARTS = ("data", "forward_backward", "optimizer")
"""The loop's parts of a step, as marked and labelled (compute and comm split the second)."""


class _Part:
    """`with watch.part(name):` a labelled range while a trace records, then a mark: a
    plain class (a generator-based context manager cost 2 µs a use on this machine)."""

    def __init__(self, watch: Watch, name: str) -> None:
        self.trace, self.mark, self.name = watch.trace, watch.timer.mark, name
        self._range: contextlib.AbstractContextManager | None = None

    def __enter__(self) -> None:
        if self.trace.active:
            self._range = self.trace.label(self.name)
            self._range.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._range is not None:
            self._range.__exit__(*exc)
            self._range = None
        self.mark(self.name)


def watch_for(
    config: Config,
    env: DistEnv,
    run_dir: Path,
    model: torch.nn.Module,
    inputs: torch.Tensor | None,
    held_in_memory: bool,
) -> tuple[Watch, list[str]]:
    """The run's Watch, the model's FLOPs counted on `inputs` (a micro-batch as the model
    sees it; None: a run resumed where its epoch has no step left counts them on the
    next epoch's first micro-batch); and the lines to say when a figure cannot be had
    (the run goes on)."""
    t, notes = config.trainer, []
    peak, device_name = peak_tflops(env.device, t.precision)
    peak = t.peak_tflops or peak
    trace = StepTrace(t.profile, run_dir / "profile", env.rank, env.device)
    knobs = loader_knobs(config, env.device, held_in_memory)
    watch = Watch(StepTimer(env.device), trace, env, None, peak, knobs)
    if t.count_flops:
        watch.uncounted = model
        if inputs is not None and (said := watch.count_flops(inputs)):
            notes.append(said)
    if watch.flops_per_sample is not None and peak is None and env.device.type == "cuda":
        notes.append(
            f"note: no peak TFLOPS known for {device_name}: set trainer.peak_tflops for perf/mfu"
        )
    return watch, notes


def loader_knobs(config: Config, device: torch.device, held_in_memory: bool) -> list[str]:
    """The settings that make this run's loader faster, with their values now."""
    data, loader = config.data, config.data.loader
    cuda = device.type == "cuda"
    knobs = []
    if not held_in_memory or data.transform is not None:  # workers run the transform
        knobs.append(f"data.loader.num_workers (now {loader.num_workers})")
    if cuda and held_in_memory and not loader.on_device:
        knobs.append("data.loader.on_device=true")
    elif cuda and not held_in_memory and data.augment is None and not data.stream.urls:
        knobs.append(
            f"data.loader.in_memory_max_mb (now {loader.in_memory_max_mb:g}: held in memory, "
            "then data.loader.on_device=true)"
        )
    if cuda and data.augment is not None and data.augment.placement == "host":
        knobs.append("data.augment.placement=device")
    if is_remote(data.root):
        knobs.append(f"data.window_shards (now {data.window_shards})")
        knobs.append(f"data.remote.prefetch_shards (now {data.remote.prefetch_shards})")
    return knobs or ["none: the split is served from memory already"]
