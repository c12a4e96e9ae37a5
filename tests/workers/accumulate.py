"""torchrun worker: one update with no_sync accumulation, parameters saved by rank 0;
and the step sums that ride on the gradient all-reduce (dist.StepSums: a flag raised
by rank 1 alone, then a NaN sample on rank 1), as every rank saw them
(OUT.pt.sums-rank<R>.json).

torchrun --nproc_per_node=2 tests/workers/accumulate.py OUT.pt MICRO ACCUMULATE
"""

import json
import sys
from contextlib import nullcontext

import torch

from ddp import dist
from ddp.data import Batch
from ddp.models import MLP
from ddp.train import apply_update, train_step, wrap_model


def main(out: str, micro: int, accumulate: int) -> None:
    env = dist.init_distributed("cpu", timeout_s=60)
    torch.manual_seed(0)  # the same initial weights and data on every rank
    model, ddp_model = wrap_model(MLP(64, 10, hidden=(32,)), env)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    inputs = torch.randn(env.world_size * accumulate * micro, 64)
    targets = torch.randint(0, 10, (len(inputs),))
    share = len(inputs) // env.world_size
    mine = slice(env.rank * share, (env.rank + 1) * share)
    batches = [
        Batch(x, y, torch.ones(len(y), dtype=torch.bool), torch.arange(len(y)))
        for x, y in zip(inputs[mine].split(micro), targets[mine].split(micro), strict=True)
    ]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    sums = dist.StepSums(env, ddp_model, ("loss", "correct", "count"), ("preempt",))
    sums.set_host(preempt=env.rank == 1)
    train_step(batches, ddp_model, scaler, nullcontext, sums)
    seen = [{"carried": sums._reduced is not None, **sums.result()}]  # no collective of its own
    apply_update(optimizer, scaler, model, grad_clip=None)
    if env.is_main:
        torch.save({"params": model.state_dict(), "inputs": inputs, "targets": targets}, out)
    if env.rank == 1:  # a NaN sample on one rank: every rank must see a non-finite loss
        batches[0].inputs[0, 0] = float("nan")
    train_step(batches, ddp_model, scaler, nullcontext, sums)
    seen.append({"carried": sums._reduced is not None, **sums.result()})
    with open(f"{out}.sums-rank{env.rank}.json", "w") as f:
        json.dump(seen, f)
    dist.shutdown(env)
    dist.exit_process(0)  # gloo's workers must not race interpreter finalization


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
