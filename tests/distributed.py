"""Run a test function on N ranks of a real process group, from inside the test.

    results = run_distributed_test(check_sums, world_size=2, func_args=(4, 3))

Each rank is a fresh process (spawn) with the launcher variables torchrun would give it
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and a free MASTER_PORT), so the process group
starts through our own `ddp.distributed.init_distributed`, on gloo. `func(env, *func_args)`
runs with the `DistEnv`; its return value comes back in a list indexed by rank. A rank's
exception fails the test with every rank's output, tagged `[rank R]`. After `timeout_s`
every rank is killed; no rank outlives the call.

For the math of our collectives (StepSums, no_sync accumulation, all_agree ...). Tests of
torchrun itself (restarts, exit codes, its store) launch real torchrun jobs instead.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests import harness

DEVICES = {"gloo": "cpu", "nccl": "cuda"}
LAUNCHER_VARS = ("TORCHELASTIC_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(func, args, rank: int, world_size: int, port: int, backend: str, out: str):
    """One rank: output to its own file, the process group up, `func`, the result pickled."""
    fd = os.open(f"{out}/rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)  # C++ (gloo) output too
    for name in [k for k in os.environ if k.startswith(LAUNCHER_VARS)]:
        del os.environ[name]
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch

    from ddp.distributed.env import detect
    from ddp.distributed.exit import exit_process
    from ddp.distributed.group import init_distributed, shutdown

    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 does for a torchrun worker

    code = 1
    try:
        env = init_distributed(detect(), torch.device(DEVICES[backend]), 60, backend)
        outcome = ("ok", func(env, *args))
        shutdown(env)
        code = 0
    except BaseException:
        outcome = ("error", traceback.format_exc())
    with open(f"{out}/rank{rank}.result", "wb") as f:
        pickle.dump(outcome, f)
    exit_process(code)  # gloo's threads must not race interpreter finalization


def run_distributed_test(
    func: Callable[..., Any],
    world_size: int = 2,
    backend: str = "gloo",
    start_method: str = "spawn",
    func_args: tuple = (),
    timeout_s: float = 120,
) -> list[Any]:
    """`func(env, *func_args)` on every rank (a module-level function: it is pickled)."""
    context = multiprocessing.get_context(start_method)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ranks-") as out:
        ranks = [
            context.Process(
                target=_rank_main,
                args=(func, func_args, rank, world_size, port, backend, out),
                name=f"rank {rank}",
            )
            for rank in range(world_size)
        ]
        for process in ranks:
            process.start()
        try:
            timed_out = not _join(ranks, time.monotonic() + timeout_s)
        finally:
            for process in ranks:
                if process.is_alive():  # not reaped yet, so the pid is still this rank's
                    harness.kill_tree(process.pid)
                process.join()
        outcomes = [_outcome(Path(out), rank) for rank in range(world_size)]
        logs = _tagged_logs(Path(out), world_size)
    print(logs, end="")  # shown by pytest when the test fails
    failed = [f"rank {r}: {o[1]}" for r, o in enumerate(outcomes) if o[0] != "ok"]
    if timed_out:
        failed.insert(0, f"timed out after {timeout_s}s")
    if failed:
        raise AssertionError("\n".join(failed) + "\n" + logs)
    return [value for _, value in outcomes]


def _join(ranks: list, deadline: float) -> bool:
    """Wait for every rank; False on timeout. Stop early when one rank fails: its peers
    would wait for it in their next collective."""
    while any(p.is_alive() for p in ranks):
        if time.monotonic() > deadline:
            return False
        if any(p.exitcode not in (None, 0) for p in ranks):
            time.sleep(1)  # let the peers report the broken collective, if they can
            return True
        time.sleep(0.05)
    return True


def _outcome(out: Path, rank: int) -> tuple[str, Any]:
    path = out / f"rank{rank}.result"
    if not path.exists():
        return ("error", "no result: killed, crashed or timed out")
    with path.open("rb") as f:
        return pickle.load(f)


def _tagged_logs(out: Path, world_size: int) -> str:
    lines = []
    for rank in range(world_size):
        path = out / f"rank{rank}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        lines += [f"[rank {rank}] {line}\n" for line in text.splitlines()]
    return "".join(lines)
