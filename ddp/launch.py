"""`python -m ddp.launch` = torchrun whose exit code is the workers'.

torchrun reports any worker failure as its own exit code 1, after a ChildFailedError
traceback, so a script cannot tell "bad input" (2) from "preempted: requeue" (75).
This runs torchrun's own launcher (same arguments, same agent) and ends with the
root-cause worker's exit code and one line saying which rank gave it:

    python -m ddp.launch --standalone --nproc-per-node=2 -m ddp.train experiment=digits

launch/local.sh, launch/multinode.sh (hence slurm/train.sbatch) and `make train` use it.

- **The root cause**: the first worker to end with one of the trainer's verdicts (2, 3,
  75, 130), else the first that did more than lose a peer (a rank that ended with 4 only
  survived another's loss), named with its host and how the others took it:
  `[ddp.launch] rank 1 (host n1) was killed by SIGKILL; rank 0 lost it (exit 4, peer lost)`.
  The verdicts are final: `--max-restarts` restarts crashes and lost peers, never those.
- **Signals sent to the launcher** (Kubernetes, systemd, `timeout`, a scheduler that
  signals the process it started): SIGTERM, SIGUSR1 and SIGINT are passed on to the
  workers, SIGHUP as SIGTERM (see `Relay`); the workers checkpoint at the next step
  boundary and exit 75 (130 for SIGINT), and so does the launcher. torch's agent never
  sees them, so it neither sends its own SIGTERM nor SIGKILLs a worker that is still
  writing. A launcher killed outright takes its workers with it
  (`ddp.distributed.exit.end_with_launcher`).
- **torch's own log lines** (`failed (exitcode: N)`, `Sending process ... closing signal`,
  a SIGKILL after its grace period) go to a file, named at the end of our line, instead
  of following the workers' lines on stderr: our line is the last one printed.

Across hosts, a rendezvous that cannot work is one line and exit 2 instead of torch's
retries and traceback: a rendezvous host that does not resolve, or whose port this
host cannot reach within the rendezvous' join_timeout, or whose port another job holds
there (checked before the agent starts), or a rendezvous that not every host joined in
time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.distributed.launcher.api as launcher_api
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.elastic.rendezvous.api import RendezvousError, RendezvousTimeoutError
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint
from torch.distributed.run import parse_args, run

from ddp.distributed.exit import LAUNCHER_PID, ExitCode
from ddp.distributed.network import this_host, wait_for_rendezvous
from ddp.errors import BadInput

C10D_PORT = 29400
"""torchrun's default port of a c10d rendezvous endpoint given without one."""
JOIN_TIMEOUT_S = 600.0
"""torchrun's default join_timeout (--rdzv-conf join_timeout=S)."""

OUR_CODES = {code.value: code.name.lower().replace("_", " ") for code in ExitCode if code}
VERDICTS = frozenset(
    code.value
    for code in (ExitCode.BAD_INPUT, ExitCode.NONFINITE, ExitCode.PREEMPTED, ExitCode.INTERRUPTED)
)
"""The trainer's own codes: the job's code whoever else failed, and never restarted."""
RELAYED = {
    signal.SIGTERM: signal.SIGTERM,
    signal.SIGUSR1: signal.SIGUSR1,
    signal.SIGINT: signal.SIGINT,
    signal.SIGHUP: signal.SIGTERM,  # the terminal went away: stop as if asked to
}
"""A signal the launcher takes -> the signal its workers get."""


def worker_exit_code(failures: dict[int, ProcessFailure]) -> tuple[int, int]:
    """(rank, exit code) of the root cause: the earliest worker that ended with one of the
    trainer's verdicts (2, 3, 75, 130), else the earliest that did more than lose a peer
    (a signal N as 128 + N), else the earliest (4: the rank that went away is elsewhere)."""
    by_time = sorted(failures.items(), key=lambda item: (item[1].timestamp, item[0]))
    verdicts = [item for item in by_time if item[1].exitcode in VERDICTS]
    causes = [item for item in by_time if item[1].exitcode != ExitCode.PEER_LOST]
    rank, first = (verdicts or causes or by_time)[0]
    return rank, 128 - first.exitcode if first.exitcode < 0 else (first.exitcode or 1)


def failure_line(failures: dict[int, ProcessFailure], host: str) -> tuple[int, str]:
    """The job's exit code, and the line naming the root cause and how the others took it.

    A rank that lost a peer (4) before the root cause ended gave up on a peer that was
    still there: stuck (SIGSTOP, a deadlock), until torch's agent ended it."""
    rank, code = worker_exit_code(failures)
    cause = failures[rank]
    who = f"rank {rank} (host {host})"
    if cause.exitcode < 0:
        how = f"was killed by {signal_name(-cause.exitcode)}"
    else:
        how = f"exited with {code} ({OUR_CODES.get(code, 'failed')})"
    if cause.exitcode == ExitCode.PEER_LOST:
        return code, f"{who} {how}: the rank it lost ran on another host (see that host's output)"
    lost = sorted(r for r, f in failures.items() if f.exitcode == ExitCode.PEER_LOST)
    if not lost:
        return code, f"{who} {how}"
    others = f"rank{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))}"
    if min(failures[r].timestamp for r in lost) < cause.timestamp:
        return code, (
            f"{who} stopped responding: {others} gave up on it (exit 4, peer lost), then it {how}"
        )
    return code, f"{who} {how}; {others} lost it (exit 4, peer lost)"


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class Relay:
    """The launcher's SIGTERM, SIGUSR1, SIGINT and SIGHUP, passed on to its workers.

    As SLURM's batch script does: the workers' own handlers (ddp.state.StopRequest) agree
    to stop at the next step boundary, checkpoint and exit 75 (130 for SIGINT), and the
    agent, which never sees the signal, waits for them as for any ending and reports
    their codes. A signal that comes while no worker runs (rendezvous, start-up checks)
    stops the agent as torch would (SignalException: it ends what it started). A signal
    the launcher inherited as ignored (nohup's SIGHUP, sbatch's `trap '' USR1`) stays so.
    """

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self.workers: list[int] = []
        self._taken = [s for s in RELAYED if signal.getsignal(s) is not signal.SIG_IGN]

    def take(self) -> None:
        """(Re)install the handlers: torch's agent installs its own as it starts workers."""
        for sig in RELAYED:
            signal.signal(sig, self._relay if sig in self._taken else signal.SIG_IGN)

    def _relay(self, signum: int, frame: Any) -> None:
        sig = signal.Signals(signum)
        self.received = self.received or sig
        running = [pid for pid in self.workers if running_child(pid)]
        if not running:
            raise SignalException(f"Process {os.getpid()} got signal: {sig}", sigval=sig)
        for pid in running:
            os.kill(pid, RELAYED[sig])

    def stop_line(self) -> str:
        """How our line starts once a signal was passed on."""
        assert self.received is not None
        sent = RELAYED[self.received]
        as_what = "" if sent == self.received else f" as {sent.name}"
        return f"{self.received.name} passed on to the workers{as_what}: "


def running_child(pid: int) -> bool:
    """`pid` is a live child of this process (not a zombie, nor a reused pid). Without
    /proc (not Linux) the agent's list is taken as it is."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return not Path("/proc/self/stat").exists()
    except OSError:
        return False
    state, parent = stat.rsplit(")", 1)[1].split()[:2]
    return state != "Z" and int(parent) == os.getpid()


def relaying_agent(relay: Relay) -> type[LocalElasticAgent]:
    """torch's agent, telling `relay` its workers and leaving the verdicts final."""

    class RelayingAgent(LocalElasticAgent):
        def _start_workers(self, worker_group: Any) -> dict[int, Any]:
            pids = super()._start_workers(worker_group)
            relay.take()
            relay.workers = list(pids.values())
            return pids

        def _monitor_workers(self, worker_group: Any) -> Any:
            result = super()._monitor_workers(worker_group)
            failures = result.failures.values() if result.is_failed() else ()
            if relay.received or any(f.exitcode in VERDICTS for f in failures):
                self._remaining_restarts = 0  # as torch does for a wedged worker
            return result

    return RelayingAgent


@contextlib.contextmanager
def agent_class(cls: type[LocalElasticAgent]) -> Iterator[None]:
    """torchrun's `run` builds `cls` as its agent."""
    original = launcher_api.LocalElasticAgent
    launcher_api.LocalElasticAgent = cls
    try:
        yield
    finally:
        launcher_api.LocalElasticAgent = original


def torch_log(path: Path) -> Path:
    """Send torch.distributed.elastic's log lines to `path` (made at the first line)."""
    handler = logging.FileHandler(path, delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("torch.distributed.elastic")
    logger.addHandler(handler)
    logger.propagate = False  # torch.distributed's handler writes to stderr
    return path


def log_path(args: Any) -> Path:
    """Our file for torch's log lines: in torchrun's --log-dir, which we make as torch
    would (a fresh /tmp/torchelastic_* directory, where it keeps the workers' error files
    and, with --redirects/--tee, their output) when none is given."""
    if not args.log_dir:
        args.log_dir = tempfile.mkdtemp(prefix="torchelastic_")
    directory = tempfile.gettempdir() if args.log_dir == os.devnull else args.log_dir
    return Path(directory) / f"ddp-launch-{this_host()}-{os.getpid()}.log"


def say(line: str, log: Path) -> None:
    """Our one line, last on stderr, naming torch's log when it holds anything."""
    where = f" (torch's log: {log})" if log.exists() and log.stat().st_size else ""
    print(f"[ddp.launch] {line}{where}", file=sys.stderr, flush=True)


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
    relay = Relay()
    relay.take()
    os.environ[LAUNCHER_PID] = str(os.getpid())  # the workers end with us (end_with_launcher)
    log = torch_log(log_path(args))
    started = time.monotonic()
    try:
        if endpoint is not None:
            wait_for_rendezvous(*endpoint, join_timeout, args.rdzv_id)
        started = time.monotonic()
        with agent_class(relaying_agent(relay)):
            run(args)
    except BadInput as err:
        say(f"error: {err}", log)
        return int(ExitCode.BAD_INPUT)
    except RendezvousError as err:  # after the checks above: the rendezvous itself failed
        host, port = endpoint or ("localhost", 0)
        # Some host never came (bad input): torch says so with a timeout, or, on a loaded
        # host, with a store error once the join deadline has passed.
        late = time.monotonic() - started >= join_timeout
        if isinstance(err, RendezvousTimeoutError) or late:
            say(
                f"error: not every host joined the rendezvous {host}:{port} "
                f"within {join_timeout:g} s (seen from {this_host()}): "
                f"are all of them started, and can they reach {host}:{port}?",
                log,
            )
            return int(ExitCode.BAD_INPUT)
        say(
            f"error: rendezvous {host}:{port} failed on {this_host()}: {type(err).__name__}: {err}",
            log,
        )
        return 1
    except ChildFailedError as err:
        code, line = failure_line(err.failures, this_host())
        say((relay.stop_line() if relay.received else "") + line, log)
        return code
    except SignalException as err:  # no worker was running, or torch's own (SIGQUIT)
        code = 128 + int(err.sigval)
        if err.sigval == signal.SIGINT:
            code = int(ExitCode.INTERRUPTED)
        say(f"stopped by {signal.Signals(err.sigval).name}", log)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
