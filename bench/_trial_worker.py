"""One trial job for bench/exit_trials.py and tests/test_dist.py (run under torchrun).

A tiny DDP training of a few steps on gloo. `--naive` uses the textbook calls
(init_process_group from env://, destroy_process_group, return from main);
otherwise the job goes through `ddp.dist`. `--crash-rank R --crash-step S`
makes rank R die at step S in the first torchrun attempt only, so that
`--max-restarts=1` must bring the job back and finish it.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp import dist as ddist


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--naive", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--crash-rank", type=int, default=-1)
    p.add_argument("--crash-step", type=int, default=2)
    return p.parse_args()


def train(steps: int, crash_rank: int, crash_step: int, rank: int) -> float:
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    loss = torch.zeros(())
    for step in range(steps):
        if attempt == 0 and rank == crash_rank and step == crash_step:
            print(f"rank {rank}: simulated crash at step {step}", file=sys.stderr, flush=True)
            os._exit(1)
        x = torch.randn(4, 8)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss)


def main_naive(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    train(args.steps, args.crash_rank, args.crash_step, rank)
    t = torch.ones(1)
    dist.all_reduce(t)
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank}: done (naive)", flush=True)


def main_fixed(args: argparse.Namespace) -> None:
    env = ddist.init_distributed("cpu", timeout_s=60)
    train(args.steps, args.crash_rank, args.crash_step, env.rank)
    total = ddist.all_reduce_sum(torch.ones(1), env)
    assert int(total.item()) == env.world_size
    stop = ddist.any_rank(env.rank == env.world_size - 1, env)
    assert stop
    print(f"rank {env.rank}: done", flush=True)
    ddist.shutdown(env)


if __name__ == "__main__":
    args = parse()
    if args.naive:
        main_naive(args)
    else:
        main_fixed(args)
        exit_process = getattr(ddist, "exit_process", None)
        if exit_process is not None:
            exit_process(0)
