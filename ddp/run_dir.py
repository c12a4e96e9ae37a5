"""The run directory: its name, whether it can take a run, and who owns it.

The name is the same on every rank, every node and every restart, so that running the
same command again continues the same run: `run.name` when given; under SLURM the job
id (kept by a requeue); otherwise the experiment's name plus a short hash of the
overrides that define the run (none: the experiment's name alone). One job owns a run
directory at a time (`RunLock`).
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import functools
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path

from ddp.errors import ConfigError

LOCK_FILE = ".lock"

OPERATIONAL_KEYS = (
    "run.",
    "hydra.",
    "hydra/",
    "logger",
    "trainer.resume",
    "trainer.progress",
    "trainer.timeout_s",
    "trainer.log_every_steps",
    "trainer.checkpoint",
    "trainer/checkpoint",
    "trainer.audit_samples",
    "trainer.noise_scale",
    "trainer.max_steps",
    "data.loader.num_workers",
    "data.loader.prefetch_factor",
    "data.loader.pin_memory",
    "data.loader.in_memory_max_mb",
    "data.remote",
    "data/remote",
)
"""Overrides that change how a run is carried out, not what it computes: they do not
name a new run (a second attempt with more workers continues the first)."""


WHERE_KEYS = ("data.root", "data.stream.urls")
"""Overrides that say where the data is: they define a run, but make poor labels."""


def defining_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides that define what a run computes, sorted (`+`/`~` prefixes dropped)."""
    return sorted(o.lstrip("+~") for o in overrides if not _operational(o))


def run_label(experiment: str, overrides: Sequence[str]) -> str:
    """A readable name for a run (W&B's): the experiment and what its overrides change,
    without paths: `digits-batch.global_size=128,model=mlp`."""
    shown = [o for o in defining_overrides(overrides) if not o.startswith(WHERE_KEYS)]
    return experiment + (f"-{','.join(shown)}" if shown else "")


def default_run_name(experiment: str = "default", overrides: Sequence[str] = ()) -> str:
    """slurm-<job>[_<task>] under SLURM; else `experiment`[-<hash of the defining overrides>]."""
    if job := os.environ.get("SLURM_JOB_ID"):
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{job}" + (f"_{task}" if task else "")
    defining = defining_overrides(overrides)
    if not defining:
        return experiment
    digest = hashlib.sha1("\n".join(defining).encode()).hexdigest()[:8]
    return f"{experiment}-{digest}"


@functools.cache
def default_sweep_name() -> str:
    """A sweep's directory: slurm-<job>, torchrun-<run id> (the same on every rank), or
    the time the sweep started (once per process)."""
    if job := os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{job}"
    if rdzv := os.environ.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun-{rdzv}"
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _operational(override: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    return key == "experiment" or key.startswith(OPERATIONAL_KEYS)


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


def remove_if_empty(run_dir: Path) -> None:
    """After a refused start: a directory this start created and left empty goes again."""
    try:
        run_dir.rmdir()  # only ever succeeds on an empty directory
    except OSError:
        pass


class RunLock:
    """One job per run directory: an exclusive POSIX lock on `run_dir/.lock`, held by the
    job's rank 0 from its start to its exit.

    The kernel (or, on NFS, the lock manager) releases the lock when its holder dies, so
    a killed job leaves no stale lock behind, only the holder's description in the file,
    which the next holder overwrites.
    """

    def __init__(self, fd: int, path: Path) -> None:
        self._fd, self.path = fd, path

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """The lock, or ConfigError naming the job that holds it."""
        path = run_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise ConfigError(f"cannot lock run directory {run_dir}: {exc.strerror}") from exc
            raise ConfigError(
                f"run directory {run_dir} is in use by {holder}; wait for that job to end, or "
                "give this one another run.name"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode() + b"\n", 0)
        return cls(fd, path)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the lock
            self._fd = -1


def _holder() -> dict[str, object]:
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job": job,
        "since": dt.datetime.now().isoformat(timespec="seconds"),
    }


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another job"
    job = f"job {info['job']}, " if info.get("job") else ""
    where = f"host {info.get('host')}, pid {info.get('pid')}, since {info.get('since')}"
    return f"another job ({job}{where})"
