"""Repeated 2-process torchrun trials: does a finished job exit 0, does a crash recover?

    python bench/exit_trials.py --trials 50 --mode both --jobs 2      # ddp.distributed, as shipped
    python bench/exit_trials.py --trials 50 --mode both --variant naive
    python bench/exit_trials.py --trials 50 --mode both --variant no-exit

Each trial is `torchrun --standalone --nproc_per_node=2 tests/workers/trial.py`
(gloo, OMP_NUM_THREADS=1, a free rendezvous port chosen by --standalone).
  clean:   train a few steps, tear down; success = torchrun exits 0.
  restart: rank 1 dies in attempt 0; `--max-restarts=1`; success = exit 0 and
           both ranks report "done" from the restarted attempt.
Variants (see tests/workers/trial.py): naive = textbook init/teardown; no-exit =
ddp.distributed without exit_process; fixed = ddp.distributed as the trainer uses it.
Prints successes/N per mode and the failure signatures (exit code, telling
stderr line) so that causes are visible.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from goals import EXIT_TRIALS, exit_code, judge, print_rows
from results import write

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "workers" / "trial.py"
LOGS = ROOT / "bench" / "results" / "exit_trials"
TELLING = [  # most specific first: the first pattern found names the failure
    "terminate called",
    "connectFullMesh failed",
    "Connection refused",
    "Connection closed by peer",
    "Timeout",
    "Error",
    "exitcode",
]


@dataclass(frozen=True)
class Trial:
    ok: bool
    returncode: int
    signature: str
    seconds: float


def torchrun_cmd(mode: str, variant: str, steps: int) -> list[str]:
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    cmd = [*torchrun, "--standalone", "--nproc_per_node=2", "--monitor-interval=0.1"]
    if mode == "restart":
        cmd.append("--max-restarts=1")
    cmd += [str(WORKER), "--steps", str(steps)]
    if mode == "restart":
        cmd += ["--crash-rank", "1", "--crash-step", "2"]
    return [*cmd, "--variant", variant]


def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


TOKEN_VAR = "EXIT_TRIALS_TOKEN"
LIVE: set[str] = set()
"""Tokens of the trials in flight, killed if we are interrupted."""


def kill_trial(token: str) -> None:
    """SIGKILL torchrun and every worker of one trial, found by the token in their env.

    torch elastic starts each worker in a session of its own, so killing torchrun's
    process group would leave workers running (and holding our pipes open).
    """
    needle = f"{TOKEN_VAR}={token}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ValueError):  # gone already, or not ours to read
            pass


def kill_live_and_exit(signum: int, _frame: object) -> None:
    for token in list(LIVE):
        kill_trial(token)
    os._exit(128 + signum)


def run_job(cmd: list[str], timeout_s: float) -> tuple[int, str, str]:
    """Run one torchrun job; on timeout kill it and all its workers."""
    token = uuid.uuid4().hex
    LIVE.add(token)
    proc = subprocess.Popen(
        cmd,
        env=child_env() | {TOKEN_VAR: token},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_trial(token)
        out, err = proc.communicate()
        return -999, out, err + "\nTimeout: killed by exit_trials"
    finally:
        kill_trial(token)  # workers orphaned by a dying agent
        LIVE.discard(token)
    return proc.returncode, out, err


def signature(returncode: int, err: str) -> str:
    """Exit code and the most telling stderr line of the last torchrun attempt."""
    err = err.split("failed (exitcode", 1)[-1] if "simulated crash" in err else err
    lines = [ln.strip() for ln in err.splitlines()]
    telling = next(
        (ln for pattern in TELLING for ln in lines if pattern in ln),
        next((ln for ln in reversed(lines) if ln), ""),
    )
    telling = re.sub(r"\[[^\]]*\.(cc|cpp|h|py):\d+\] ", "", telling)  # C++ log prefixes
    telling = re.sub(r"\]:\d+", "]:PORT", telling)  # so that equal causes count together
    return f"rc={returncode} | {telling[:160]}"


def one_trial(mode: str, variant: str, steps: int, timeout_s: float) -> Trial:
    start = time.monotonic()
    cmd = torchrun_cmd(mode, variant, steps)
    rc, out, err = run_job(cmd, timeout_s)
    done = len(re.findall(r"rank \d+: done", out))
    ok = rc == 0 and done == 2
    sig = "" if ok else signature(rc, err) + ("" if done == 2 else f" | done={done}")
    if not ok:
        keep_log(mode, cmd, rc, out, err)
    return Trial(ok, rc, sig, time.monotonic() - start)


def keep_log(mode: str, cmd: list[str], rc: int, out: str, err: str) -> None:
    """Full output of a failed trial, for reading the cause (not committed: .gitignore)."""
    LOGS.mkdir(parents=True, exist_ok=True)
    path = LOGS / f"{mode}-{time.strftime('%H%M%S')}-{os.getpid()}-{time.monotonic_ns()}.log"
    path.write_text(f"$ {' '.join(cmd)}\nrc={rc}\n--- stdout\n{out}\n--- stderr\n{err}")


def run_mode(mode: str, args: argparse.Namespace) -> list[Trial]:
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [
            pool.submit(one_trial, mode, args.variant, args.steps, args.timeout)
            for _ in range(args.trials)
        ]
        trials = []
        for i, fut in enumerate(futures):
            t = fut.result()
            trials.append(t)
            if args.verbose or not t.ok:
                status = "ok  " if t.ok else "FAIL"
                print(f"  [{mode} {i:3d}] {status} {t.seconds:5.1f}s {t.signature}", flush=True)
    return trials


def report(mode: str, trials: list[Trial], variant: str) -> None:
    ok = sum(t.ok for t in trials)
    print(f"{mode:8s} ({variant}): {ok}/{len(trials)} successes", flush=True)
    for sig, n in collections.Counter(t.signature for t in trials if not t.ok).most_common():
        print(f"    {n:3d} x {sig}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--mode", choices=["clean", "restart", "both"], default="both")
    p.add_argument("--jobs", type=int, default=2, help="trials run at once")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per trial")
    p.add_argument("--variant", choices=["naive", "no-exit", "fixed"], default="fixed")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--json", type=Path, help="the results file (default: bench/results/)")
    args = p.parse_args()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, kill_live_and_exit)
    modes = ["clean", "restart"] if args.mode == "both" else [args.mode]
    results = {m: run_mode(m, args) for m in modes}
    for mode, trials in results.items():
        report(mode, trials, args.variant)
    rows = [
        judge(f"{mode} ({args.variant}): successes / trials", EXIT_TRIALS, ok_fraction(trials))
        for mode, trials in results.items()
    ]
    print_rows(rows)
    numbers = {
        "options": {k: v for k, v in vars(args).items() if k != "json"},
        "modes": {mode: summary(trials) for mode, trials in results.items()},
        "goals": rows,
    }
    write(f"exit-trials-{args.variant}", numbers, args.json)
    return exit_code(rows)


def ok_fraction(trials: list[Trial]) -> float:
    return sum(t.ok for t in trials) / len(trials)


def summary(trials: list[Trial]) -> dict:
    failures = collections.Counter(t.signature for t in trials if not t.ok)
    return {
        "successes": sum(t.ok for t in trials),
        "trials": len(trials),
        "failures": dict(failures.most_common()),
    }


if __name__ == "__main__":
    sys.exit(main())
