"""One trial job for tests/test_dist.py and bench/exit_trials.py (run under torchrun).

A tiny DDP training of a few steps on gloo, in one of three variants:
  naive    the textbook calls: init_process_group from env://, barrier,
           destroy_process_group, return from main;
  no-exit  `ddp.distributed` (per-attempt store, named collectives, shutdown) but the
           process ends by returning from main, through interpreter finalization;
  fixed    the same, ending with `ddp.distributed.exit.exit_process(0)`, as the trainer does.
`--crash-rank R --crash-step S` makes rank R die at step S in the first torchrun
attempt only, so that `--max-restarts=1` must bring the job back and finish it.

Each rank prints one line `rank R: done {json}` when it has finished, with what
it saw (launcher ranks, attempt, the answers of all_agree/any_rank to a flag
that only the last rank holds: `collectives`), for the tests to check.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", choices=["naive", "no-exit", "fixed"], default="fixed")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--crash-rank", type=int, default=-1)
    p.add_argument("--crash-step", type=int, default=2)
    return p.parse_args()


def attempt() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def train(model: DDP, steps: int, crash_rank: int, crash_step: int, rank: int) -> float:
    """A few SGD steps; the model stays referenced by the caller, as in a real trainer."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.zeros(())
    for step in range(steps):
        if attempt() == 0 and rank == crash_rank and step == crash_step:
            print(f"rank {rank}: simulated crash at step {step}", file=sys.stderr, flush=True)
            os._exit(1)
        loss = model(torch.randn(4, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def collectives(env) -> dict:
    """What this rank sees of the launcher and of each named collective of `ddp.distributed`."""
    from ddp.distributed import collectives as comm
    from ddp.distributed.env import detect

    launch = detect()
    last = env.rank == env.world_size - 1
    return {
        "detect": {k: getattr(launch, k) for k in ("rank", "local_rank", "world_size")},
        "attempt": launch.restart_count,
        "all_agree": comm.all_agree(last, env),
        "any_rank": comm.any_rank(last, env),
        "world_from_sum": int(comm.all_reduce_sum(torch.ones(1), env).item()),
        "from_rank0": comm.broadcast_object(f"hello from {env.rank}", env),
        "gathered": [b.hex() for b in comm.all_gather_bytes(bytes([env.rank] * 3), env)],
        # over the capacity on the last rank: every rank takes all_gather_object
        "gathered_sizes": [
            len(b) for b in comm.all_gather_bytes(bytes(60 if last else 5), env, capacity=50)
        ],
    }


def main_naive(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(8, 1))
    train(model, args.steps, args.crash_rank, args.crash_step, rank)
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank}: done (naive)", flush=True)


def main_ddp(args: argparse.Namespace) -> None:
    # Not imported by the naive variant: it owes nothing to ddp.
    from ddp.distributed.env import detect
    from ddp.distributed.exit import exit_process
    from ddp.distributed.group import init_distributed, shutdown

    env = init_distributed(detect(), torch.device("cpu"), timeout_s=60)
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(8, 1))
    loss = train(model, args.steps, args.crash_rank, args.crash_step, env.rank)
    seen = {**collectives(env), "loss": loss}
    shutdown(env)
    print(f"rank {env.rank}: done {json.dumps(seen)}", flush=True)
    if args.variant == "fixed":
        exit_process(0)


if __name__ == "__main__":
    args = parse()
    if args.variant == "naive":
        main_naive(args)
    else:
        main_ddp(args)
