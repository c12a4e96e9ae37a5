"""The `ddp-train` command (also `python -m ddp.train`): Hydra in, an exit code out.

Exit codes: 0 done, 2 bad input (one line naming the culprit, nothing already written
changed), 3 non-finite loss, 75 preempted and 130 interrupted (a checkpoint was written:
run the same command again to continue), 1 a bug (with its traceback).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from ddp.compose import CONF_DIR, register, to_config
from ddp.config_moves import moved_key_hint
from ddp.distributed.exit import ExitCode, end_with_launcher, exit_process
from ddp.distributed.lost_peer import peer_lost_line
from ddp.distributed.say_once import say_error
from ddp.errors import BadInput
from ddp.run_dir import remove_if_empty
from ddp.setup import STOP_SIGNALS
from ddp.train import train

BAD_INPUT = BadInput

register()


# An absolute path: a console script imports ddp.train as a package module, where a
# relative config_path would be looked up as a Python package named conf.
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_entry(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    sweep_dir = Path(hc.sweep.dir) if hc.mode.name == "MULTIRUN" else None
    run_dir = Path(hc.runtime.output_dir)
    try:
        code = train(to_config(cfg), run_dir, sweep_dir, list(hc.overrides.task))
    except BAD_INPUT as exc:
        if getattr(exc, "shown", True):  # a refusal all ranks agreed on: from one of them
            say_error(str(exc))
        remove_if_empty(run_dir)  # a new run refused leaves no empty directory behind
        code = ExitCode.BAD_INPUT
    except OSError as exc:  # caught here, or Hydra adds its "Error executing job" lines
        say_error(f"{exc.filename or run_dir}: {exc.strerror or exc}")
        remove_if_empty(run_dir)
        code = ExitCode.BAD_INPUT
    except RuntimeError as exc:  # a collective whose peer went away: one line, no traceback
        if (line := peer_lost_line(exc, cfg.trainer.timeout_s)) is None:
            raise
        say_error(line.removeprefix("error: "))  # one survivor's line, not one per survivor
        code = ExitCode.PEER_LOST
    if code != ExitCode.OK:
        sys.exit(int(code))  # Hydra returns nothing: the exit code travels as SystemExit


def keep_freed_memory() -> None:
    """Keep freed blocks in glibc's heap instead of handing them back to the OS.

    Above glibc's mmap threshold every step's activations would land on fresh pages
    and be zero-filled again on first touch: 2.7 M page faults and a third of the
    steps/s of a CPU CNN (bench/overhead.py). No-op without glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum
    libc.mallopt(m_trim_threshold, 256 << 20)


def stop_before_training(signum: int, frame: object) -> None:
    """SIGTERM or SIGHUP during the start's checks: stop as the default action would
    (128 + N), but first remove the run directory Hydra made for this start if nothing
    was written to it. A launcher stops the other ranks of a refused start this way, some
    of them just after Hydra made the directory. (ddp.train.train puts the default action
    back before it waits on the process group, where a Python handler could not run.)"""
    if HydraConfig.initialized() and HydraConfig.get().mode.name == "RUN":
        remove_if_empty(Path(HydraConfig.get().run.dir))
    raise SystemExit(128 + signum)


def main() -> None:
    end_with_launcher()
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is signal.SIG_DFL:  # (one ignored, e.g. by nohup, stays so)
            signal.signal(sig, stop_before_training)
    keep_freed_memory()
    # Hydra's own errors (an unknown key, a wrong type, a run directory it cannot make)
    # then reach us as exceptions instead of a message and exit code 1.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        _hydra_entry()
        code = ExitCode.OK
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except (HydraException, OmegaConfBaseException) as exc:
        say_error(hydra_error(exc))
        code = ExitCode.BAD_INPUT
    except OSError as exc:  # e.g. Hydra making the run directory on a read-only file system
        say_error(f"{exc.filename or 'the run directory'}: {exc.strerror}")
        code = ExitCode.BAD_INPUT
    except Exception:  # noqa: BLE001 - a bug: its traceback, exit 1, no finalization race
        traceback.print_exc()
        code = 1
    exit_process(code)


def hydra_error(exc: Exception) -> str:
    """Hydra's message and its cause's (which names the key), on one line."""
    parts = [str(exc).strip().splitlines()[0]] if str(exc).strip() else []
    cause = exc.__cause__
    if isinstance(cause, OmegaConfBaseException) and str(cause).strip():
        parts.append(str(cause).strip().splitlines()[0])
    return moved_key_hint(": ".join(parts)) or type(exc).__name__


if __name__ == "__main__":
    main()
