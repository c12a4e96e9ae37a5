"""The run directory: its name, and whether it can take a run.

The name is the same on every rank and across restarts: run.name, else the SLURM
job id (kept by a requeue), else torchrun's run id (kept by --max-restarts).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

from ddp.validate import ConfigError


def default_run_name() -> str:
    """slurm-<job>[_<task>], torchrun-<run id>, or (plain python) a timestamp."""
    if job := os.environ.get("SLURM_JOB_ID"):
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{job}" + (f"_{task}" if task else "")
    if rdzv := os.environ.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun-{rdzv}"
    return dt.datetime.now().strftime("local-%Y%m%d-%H%M%S")


def check_writable(run_dir: Path, min_free_bytes: int = 64 << 20) -> None:
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
