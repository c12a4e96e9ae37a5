"""Traces on request: `trainer.profile=[START,END]` records global steps START..END
(counted from 1, as train records number them) with torch.profiler on every rank, into
run_dir/profile/rank<R>-steps<START>-<END>.json.gz (Chrome trace format: Perfetto,
chrome://tracing or TensorBoard open it). The step's parts carry the breakdown's names
(`data`, `forward_backward`, `optimizer`, `checkpoint`) as labelled ranges."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function


class StepTrace:
    """A torch.profiler window over global steps [start, end], or nothing (window None)."""

    def __init__(
        self, window: list[int] | None, directory: Path, rank: int, device: torch.device
    ) -> None:
        self.window, self.rank, self.device = window, rank, device
        self.directory = directory
        self._profiler: profile | None = None
        self._first = self._last = 0
        self.written: Path | None = None

    @property
    def active(self) -> bool:
        return self._profiler is not None

    def label(self, name: str) -> contextlib.AbstractContextManager:
        """A labelled range in the trace while one is recorded (else nothing, at no cost)."""
        return record_function(name) if self._profiler is not None else contextlib.nullcontext()

    def step_begins(self, number: int) -> None:
        """Global step `number` (from 1) is about to start: open or close the window."""
        if self.window is None:
            return
        start, end = self.window
        self._last = number
        if self._profiler is None and start <= number <= end and self.written is None:
            # kineto's stage lines on stderr are noise in a job's log (a level set wins)
            os.environ.setdefault("KINETO_LOG_LEVEL", "6")
            activities = [ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self._profiler = profile(activities=activities)
            self._profiler.start()
            self._first = number
        elif self._profiler is not None and number > end:
            self.close(end)

    def close(self, last: int | None = None) -> Path | None:
        """Stop recording (the run ended inside the window, or it passed) and write the
        trace; returns its path."""
        if self._profiler is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the window's GPU work, complete
        profiler, self._profiler = self._profiler, None
        profiler.stop()
        end = min(self.window[1], self._last) if last is None else last
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"rank{self.rank}-steps{self._first}-{end}.json.gz"
        profiler.export_chrome_trace(str(path))  # gzipped for a .gz name
        self.written = path
        return path
