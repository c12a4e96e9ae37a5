"""`python -m ddp.launch` = torchrun whose exit code is the workers'.

torchrun reports any worker failure as its own exit code 1, after a ChildFailedError
traceback, so a script cannot tell "bad input" (2) from "preempted: requeue" (75).
This runs torchrun's own launcher (same arguments, same agent) and ends with the
root-cause worker's exit code and one line saying which rank gave it:

    python -m ddp.launch --standalone --nproc-per-node=2 -m ddp.train experiment=digits

launch/local.sh, launch/multinode.sh (hence slurm/train.sbatch) and `make train` use it.
"""

from __future__ import annotations

import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.run import parse_args, run

from ddp.dist.exit import ExitCode

OUR_CODES = {code.value: code.name.lower().replace("_", " ") for code in ExitCode if code}


def worker_exit_code(failures: dict[int, ProcessFailure]) -> tuple[int, int]:
    """(rank, exit code) of the root cause: the earliest worker that ended with one of the
    trainer's codes (2, 3, 75, 130), else the earliest failure (a signal N as 128 + N)."""
    by_time = sorted(failures.items(), key=lambda item: (item[1].timestamp, item[0]))
    ours = [(rank, f.exitcode) for rank, f in by_time if f.exitcode in OUR_CODES]
    if ours:
        return ours[0]
    rank, first = by_time[0]
    return rank, 128 - first.exitcode if first.exitcode < 0 else (first.exitcode or 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as err:
        rank, code = worker_exit_code(err.failures)
        meaning = OUR_CODES.get(code, "failed")
        print(f"[ddp.launch] rank {rank} exited with {code} ({meaning})", file=sys.stderr)
        return code
    except SignalException as err:  # the agent itself was told to stop (Ctrl-C, kill)
        code = 128 + int(err.sigval)
        if err.sigval == signal.SIGINT:
            code = int(ExitCode.INTERRUPTED)
        print(f"[ddp.launch] stopped by {signal.Signals(err.sigval).name}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
