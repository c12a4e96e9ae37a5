"""Where a step's time goes: waiting for data, compute, communication, the optimizer.

Each step is marked at its start and at the end of its parts (`data`, `forward_backward`,
`optimizer`); the DDP communication hook marks when the last gradient bucket was ready,
which splits forward_backward into compute and the wait for the all-reduce after it
(`comm`). On a CPU a mark is the host clock. On a GPU it is a CUDA event on the
current stream, so the parts are GPU time (the GPU idling for data shows as `data`);
the events are read once the GPU has passed them, never with a host sync of their own.
Whatever the epoch's wall time holds besides the steps' parts (evaluation, checkpoints,
logging, the host falling behind) is `other`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

PARTS = ("data", "compute", "comm", "optimizer")
"""A step's parts, in order; with `other` they make up the wall time."""


@dataclass(frozen=True)
class Breakdown:
    """Seconds per part over a stretch of wall time."""

    seconds: dict[str, float]
    wall: float

    def fractions(self) -> dict[str, float]:
        """Each part's share of the wall time, `other` the rest: they sum to 1. (Parts
        timed on a GPU can add up to a little more than the host's wall time: then they
        are scaled down and `other` is 0.)"""
        busy = sum(self.seconds.values())
        scale = 1 / max(self.wall, busy, 1e-12)
        shares = {part: self.seconds[part] * scale for part in PARTS}
        return {**shares, "other": max(0.0, 1.0 - sum(shares.values()))}

    def as_metrics(self, prefix: str = "time/") -> dict[str, float]:
        """<prefix><part> fractions, and the wall time they share (<prefix>wall_s)."""
        metrics = {f"{prefix}{part}": share for part, share in self.fractions().items()}
        return {**metrics, f"{prefix}wall_s": self.wall}


class StepTimer:
    """The parts of every step, summed per epoch and per logging interval (a few
    microseconds a step: bench/perf_bench.py)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._marks: dict[str, object] = {}
        self._pending: deque[dict[str, object]] = deque()
        """Steps whose marks the GPU has not passed yet (CUDA)."""
        self._epoch = [0.0] * len(PARTS)
        self._interval = [0.0] * len(PARTS)
        self._epoch_since = self._interval_since = time.perf_counter()
        self.mark = self._record_event if self.cuda else self._read_clock
        """mark(name): the step reached `name`: "start", the end of a part, or
        "grads_ready" (the hook, for each bucket: the last one's mark stays)."""

    def _read_clock(self, name: str) -> None:
        self._marks[name] = time.perf_counter()

    def _record_event(self, name: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self._marks[name] = event

    def end_step(self) -> None:
        """Add up the step (on a GPU: queue it, and add up every queued step the GPU has
        finished)."""
        marks, self._marks = self._marks, {}
        if not self.cuda:
            self._add(marks)
            return
        self._pending.append(marks)
        self._read(wait=False)

    def epoch(self) -> Breakdown:
        """The epoch's parts (every step's, waiting for the GPU to finish them) over the
        wall time since the last call (the first: since the timer was made)."""
        self._read(wait=True)
        now = time.perf_counter()
        breakdown = Breakdown(dict(zip(PARTS, self._epoch, strict=True)), now - self._epoch_since)
        self._epoch = [0.0] * len(PARTS)
        self._epoch_since = now
        return breakdown

    def interval(self) -> Breakdown:
        """The parts of the steps read since the last call, over the wall time since then
        (no wait: on a GPU the last step or so is counted in the next interval)."""
        now = time.perf_counter()
        seconds = dict(zip(PARTS, self._interval, strict=True))
        breakdown = Breakdown(seconds, now - self._interval_since)
        self._interval = [0.0] * len(PARTS)
        self._interval_since = now
        return breakdown

    def restart(self) -> None:
        """Start both stretches now (the loop begins: start-up is not an epoch's)."""
        self._epoch_since = self._interval_since = time.perf_counter()

    def _read(self, wait: bool) -> None:
        while self._pending:
            last = self._pending[0].get("optimizer")
            if last is not None and not wait and not last.query():
                return
            self._add(self._pending.popleft())

    def _add(self, marks: dict[str, object]) -> None:
        if "optimizer" not in marks or "start" not in marks:
            return  # a step left half-way (a stop): not counted
        for i, seconds in enumerate(self._parts(marks)):
            self._epoch[i] += seconds
            self._interval[i] += seconds

    def _parts(self, marks: dict[str, object]) -> tuple[float, float, float, float]:
        """Seconds per part (PARTS' order) of one step from its marks."""
        between = self._elapsed
        data = between(marks["start"], marks["data"])
        forward_backward = between(marks["data"], marks["forward_backward"])
        comm = 0.0
        if "grads_ready" in marks:  # the all-reduce still running after the last bucket
            comm = min(forward_backward, between(marks["grads_ready"], marks["forward_backward"]))
            comm = max(comm, 0.0)
        optimizer = between(marks["forward_backward"], marks["optimizer"])
        return data, forward_backward - comm, comm, optimizer

    def _elapsed(self, start: object, end: object) -> float:
        if self.cuda:
            end.synchronize()  # passed already (queried, or the epoch's end): no wait
            return start.elapsed_time(end) / 1000.0
        return end - start
