"""How a process ends: the exit codes of the contract, and an exit gloo cannot abort.

gloo runs collectives on its own worker threads, and a worker drops its reference to
a finished work object (e.g. the last barrier's) a moment after the caller's wait()
returned. That object's captured ThreadLocalState holds a Python object, so its
destructor takes the GIL. If the main thread has already reached Py_FinalizeEx,
CPython ends the worker with pthread_exit inside that (noexcept) destructor, and
libstdc++ calls std::terminate: "terminate called without an active exception",
SIGABRT, exit code -6, in about 1 run of 6 on a loaded 2-core machine.
destroy_process_group does not join these threads (the process group lives on while
DDP references it) and a barrier only produces one more such work object.
`exit_process` runs the Python exit handlers and then leaves with os._exit, so no
interpreter finalization races the workers.

A worker of `python -m ddp.launch` also ends when its launcher does (`end_with_launcher`):
a launcher killed outright (SIGKILL, the OOM killer) leaves no worker training on,
holding the run directory.
"""

from __future__ import annotations

import atexit
import ctypes
import enum
import logging
import os
import signal
import sys
from typing import Any, NoReturn


class ExitCode(enum.IntEnum):
    """What the job's exit status tells whoever launched it."""

    OK = 0
    BAD_INPUT = 2
    """A config value, a shard, a checkpoint or a run directory that cannot be used."""
    NONFINITE = 3
    """The loss was not finite (trainer.nonfinite=stop, or too many skipped steps)."""
    PEER_LOST = 4
    """Another rank went away (killed, crashed, stuck past trainer.timeout_s): this rank
    survived it. Never the root cause: the launcher reports the rank that went first."""
    PREEMPTED = 75
    """EX_TEMPFAIL: a checkpoint was written on request; run again (requeue) to continue."""
    INTERRUPTED = 130
    """Ctrl-C (SIGINT, 128 + 2, as shells report it): a checkpoint was written; run again."""


LAUNCHER_PID = "DDP_LAUNCHER_PID"
"""Set by `python -m ddp.launch` in its workers' environment: its own pid."""
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def end_with_launcher() -> None:
    """A worker started by `python -m ddp.launch` gets SIGTERM when the launcher dies.

    SIGTERM, not SIGKILL: the workers, which all get it at once, agree to stop at the
    next step boundary, checkpoint and exit 75, as if preempted; a worker still starting
    up (no handler yet) simply ends. Linux only (prctl PR_SET_PDEATHSIG), and only for
    the launcher's own children: the variable is removed here, so this process's own
    children (DataLoader workers, tools) neither inherit it nor take the launcher for
    their parent. The launcher starts its workers from its main thread, which lives as
    long as it does (the kernel sends the signal when the parent *thread* ends).
    """
    launcher = os.environ.pop(LAUNCHER_PID, None)
    if launcher is None or not sys.platform.startswith("linux"):
        return
    parent = int(launcher)
    if os.getppid() != parent and _alive(parent):  # started by a worker, not by the launcher
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # it died while this process started up
        os.kill(os.getpid(), signal.SIGTERM)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: the pid was reused
        pass
    return True


_retired: list[Any] = []


def retire(*objects: Any) -> None:
    """Keep objects that own the process group (the DDP module) alive until exit_process.

    Freeing them destroys the ProcessGroupGloo, which joins its worker threads while the
    main thread holds the GIL; a worker still releasing a finished work object needs the
    GIL to drop its tensors: a deadlock (seen between the points of a sweep under
    torchrun). exit_process never runs those destructors.
    """
    _retired.extend(objects)


def exit_process(code: int = 0) -> NoReturn:
    """End the process with `code`, skipping interpreter finalization.

    Call it last in the trainer's entry point, after the process group's shutdown,
    with the code SLURM and CI should see. Python's atexit handlers still run (W&B,
    multiprocessing/DataLoader worker cleanup, logging) and stdio is flushed; only
    Py_FinalizeEx is skipped, the phase in which a gloo worker thread that releases
    its last work object is ended by CPython inside a noexcept C++ destructor and
    aborts the process (SIGABRT, see the module docstring).
    (`atexit._run_exitfuncs` is undocumented but present in every CPython 3.)
    """
    try:
        atexit._run_exitfuncs()
        logging.shutdown()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed or broken pipe must not change the exit code
                pass
        os._exit(code)
