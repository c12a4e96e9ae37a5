"""`python -m ddp.launch` = torchrun whose exit code is the workers'.

torchrun reports any worker failure as its own exit code 1, after a ChildFailedError
traceback, so a script cannot tell "bad input" (2) from "preempted: requeue" (75).
This runs torchrun's own launcher (same arguments, same agent) and ends with the
root-cause worker's exit code and one line saying which rank gave it:

    python -m ddp.launch --standalone --nproc-per-node=2 -m ddp.train experiment=digits

launch/local.sh, launch/multinode.sh (hence slurm/train.sbatch) and `make train` use it.

Across hosts, a rendezvous that cannot work is one line and exit 2 instead of torch's
retries and traceback: a rendezvous host that does not resolve, or whose port this
host cannot reach within the rendezvous' join_timeout, or whose port another job holds
there (checked before the agent starts), or a rendezvous that not every host joined in
time.
"""

from __future__ import annotations

import signal
import sys
import time

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.elastic.rendezvous.api import RendezvousError, RendezvousTimeoutError
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint
from torch.distributed.run import parse_args, run

from ddp.dist.exit import ExitCode
from ddp.dist.network import this_host, wait_for_rendezvous
from ddp.errors import BadInput

C10D_PORT = 29400
"""torchrun's default port of a c10d rendezvous endpoint given without one."""
JOIN_TIMEOUT_S = 600.0
"""torchrun's default join_timeout (--rdzv-conf join_timeout=S)."""

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


def rendezvous_endpoint(args) -> tuple[str, int] | None:
    """(host, port) of a multi-host c10d rendezvous; None for --standalone and others."""
    if args.standalone or args.rdzv_backend != "c10d" or not args.rdzv_endpoint:
        return None
    return parse_rendezvous_endpoint(args.rdzv_endpoint, default_port=C10D_PORT)


def join_timeout_s(rdzv_conf: str) -> float:
    """join_timeout from --rdzv-conf "k=v,k=v" (torchrun's default otherwise)."""
    pairs = dict(item.split("=", 1) for item in rdzv_conf.split(",") if "=" in item)
    return float(pairs.get("join_timeout", JOIN_TIMEOUT_S))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    endpoint = rendezvous_endpoint(args)
    join_timeout = join_timeout_s(args.rdzv_conf)
    started = time.monotonic()
    try:
        if endpoint is not None:
            wait_for_rendezvous(*endpoint, join_timeout, args.rdzv_id)
        started = time.monotonic()
        run(args)
    except BadInput as err:
        print(f"[ddp.launch] error: {err}", file=sys.stderr)
        return int(ExitCode.BAD_INPUT)
    except RendezvousError as err:  # after the checks above: the rendezvous itself failed
        host, port = endpoint or ("localhost", 0)
        # Some host never came (bad input): torch says so with a timeout, or, on a loaded
        # host, with a store error once the join deadline has passed.
        late = time.monotonic() - started >= join_timeout
        if isinstance(err, RendezvousTimeoutError) or late:
            print(
                f"[ddp.launch] error: not every host joined the rendezvous {host}:{port} "
                f"within {join_timeout:g} s (seen from {this_host()}): "
                f"are all of them started, and can they reach {host}:{port}?",
                file=sys.stderr,
            )
            return int(ExitCode.BAD_INPUT)
        print(
            f"[ddp.launch] error: rendezvous {host}:{port} failed on {this_host()}: "
            f"{type(err).__name__}: {err}",
            file=sys.stderr,
        )
        return 1
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
