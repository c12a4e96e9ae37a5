"""The baseline: a minimal hand-written DDP loop over the same samples as ddp.train.

    torchrun --standalone --nproc_per_node=2 bench/raw_ddp.py --data data/digits \
        --model mlp --global-size 64 --micro-size 16 --epochs 5 --run-dir /tmp/raw

Every sample of the shards is read into memory once (ddp's shard reader), a
DistributedSampler shuffles them each epoch, micro-batches are sliced straight
out of the in-memory tensors, gradients accumulate under `no_sync` and sync on
the last micro-batch (nanoGPT's loop). Same model, AdamW, warmup-cosine, grad
clip and seed as the default config; validation over the whole val split each
epoch, reduced exactly across ranks. No checkpoints, no logger. Rank 0 prints one
`BENCH_RESULT {json}` line (bench/overhead_common.py).
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead_common as common  # noqa: E402


@torch.no_grad()
def evaluate(model, inputs, targets, micro: int, rank: int, world: int, device) -> list[float]:
    model.eval()
    mine = np.array_split(np.arange(len(targets)), world)[rank]
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for start in range(0, len(mine), micro):
        idx = torch.from_numpy(mine[start : start + micro])
        x, y = inputs[idx].to(device), targets[idx].to(device)
        logits = model(x)
        sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
        sums[1] += (logits.argmax(1) == y).sum().double()
        sums[2] += len(y)
    model.train()
    if world > 1:
        dist.all_reduce(sums)
    return sums.tolist()


def main() -> None:
    args = common.job_args(__doc__.splitlines()[0])
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = common.device_for(local_rank)
    if world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=dt.timedelta(seconds=300))
    torch.manual_seed(args.seed + rank)

    train_x, train_y = common.load_split(f"{args.data}/train")
    val_x, val_y = common.load_split(f"{args.data}/val")
    model = common.build_model(args, in_features=train_x[0].numel()).to(device)
    ddp_model = model
    if world > 1:
        ddp_model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=common.LR, betas=common.BETAS, weight_decay=common.WEIGHT_DECAY
    )

    accumulate = args.global_size // (args.micro_size * world)
    steps = common.iterations_per_epoch(len(train_y), args.global_size)
    padded = common.Wrapped(train_x, train_y, steps * args.global_size)
    sampler = DistributedSampler(
        padded, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=False
    )
    total = steps * args.epochs

    first_step_time = None
    epoch_end_times, train_seconds = [], []
    global_step = 0
    ddp_model.train()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), dtype=torch.int64) % len(train_y)
        common.sync(device)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = common.lr_at(global_step, total)
            for micro in range(accumulate):
                at = (step * accumulate + micro) * args.micro_size
                idx = order[at : at + args.micro_size]
                x, y = train_x[idx].to(device), train_y[idx].to(device)
                last = micro == accumulate - 1
                with nullcontext() if last or world == 1 else ddp_model.no_sync():
                    loss = F.cross_entropy(ddp_model(x), y)
                    (loss / accumulate).backward()
                loss_sum += loss.detach()
            if args.step_flags and world > 1:
                flags = torch.zeros(3, dtype=torch.int32, device=device)
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                flags.tolist()
            torch.nn.utils.clip_grad_norm_(model.parameters(), common.GRAD_CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            if first_step_time is None:
                common.sync(device)
                first_step_time = common.now()
        common.sync(device)
        train_seconds.append(time.perf_counter() - t0)
        val = evaluate(model, val_x, val_y, args.micro_size, rank, world, device)
        epoch_end_times.append(common.now())
        if rank == 0:
            print(
                f"epoch {epoch}: train loss {loss_sum.item() / (steps * accumulate):.4f} | "
                f"val loss {val[0] / val[2]:.4f} acc {val[1] / val[2]:.4f}",
                flush=True,
            )

    if rank == 0:
        common.emit(
            {
                "program": "raw",
                "world_size": world,
                "device": device.type,
                "steps_per_epoch": steps,
                "samples_per_epoch": steps * args.global_size,
                "first_step_time": first_step_time,
                "epoch_end_times": epoch_end_times,
                "train_seconds": train_seconds,
            }
        )
    if world > 1:
        dist.barrier()  # no rank closes its sockets while a peer is in its last collective
        dist.destroy_process_group()
    common.exit_now(0)


if __name__ == "__main__":
    main()
