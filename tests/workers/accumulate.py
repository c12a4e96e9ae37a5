"""torchrun worker: one update with no_sync accumulation, parameters saved by rank 0;
and the step sums that ride on the gradient all-reduce (a flag raised by rank 1 alone,
then a NaN sample on rank 1), as every rank saw them (OUT.pt.sums-rank<R>.json).

torchrun --nproc_per_node=2 tests/workers/accumulate.py OUT.pt MICRO ACCUMULATE
"""

import json
import sys
from contextlib import nullcontext
from dataclasses import asdict

import torch

from ddp.build import wrap_ddp
from ddp.data.batch import Batch
from ddp.dist.env import detect
from ddp.dist.exit import exit_process
from ddp.dist.group import init_distributed, shutdown
from ddp.models import MLP
from ddp.state import Training
from ddp.step import Stepper


def main(out: str, micro: int, accumulate: int) -> None:
    env = init_distributed(detect(), torch.device("cpu"), timeout_s=60)
    torch.manual_seed(0)  # the same initial weights and data on every rank
    model = MLP(64, 10, hidden=(32,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    training = Training(model, model, optimizer, scaler, plateau=None)
    wrap_ddp(training, env)
    inputs = torch.randn(env.world_size * accumulate * micro, 64)
    targets = torch.randint(0, 10, (len(inputs),))
    share = len(inputs) // env.world_size
    mine = slice(env.rank * share, (env.rank + 1) * share)
    batches = [
        Batch(x, y, torch.ones(len(y), dtype=torch.bool), torch.arange(len(y)))
        for x, y in zip(inputs[mine].split(micro), targets[mine].split(micro), strict=True)
    ]
    stepper = Stepper(training, env, nullcontext, grad_clip=None)

    def step(preempt: bool) -> dict:
        stepper.begin(0.5, skipped=0, preempt=preempt, save=0)
        for j, batch in enumerate(batches):
            stepper.forward_backward(batch, accumulate, last=j == accumulate - 1)
        carried = stepper.sums._reduced is not None  # no collective of its own
        return {"carried": carried, **asdict(stepper.finish())}

    seen = [step(preempt=env.rank == 1)]  # raised by rank 1 alone
    if env.is_main:
        torch.save({"params": model.state_dict(), "inputs": inputs, "targets": targets}, out)
    if env.rank == 1:  # a NaN sample on one rank: every rank must see a non-finite loss
        batches[0].inputs[0, 0] = float("nan")
    seen.append(step(preempt=False))
    with open(f"{out}.sums-rank{env.rank}.json", "w") as f:
        json.dump(seen, f)
    shutdown(env)
    exit_process(0)  # gloo's workers must not race interpreter finalization


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
