"""What the baselines of bench/overhead.py share: the job description, the data in
memory, the learning-rate schedule and the one JSON line each program prints.

Kept free of Lightning and of ddp.train so the raw loop imports only torch, numpy
and ddp's shard reader.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time

import numpy as np
import torch

RESULT_PREFIX = "BENCH_RESULT "

# The values of conf/ (model/*.yaml, optim/adamw.yaml, schedule/warmup_cosine.yaml,
# trainer/default.yaml) so the baselines train the very job ddp.train trains.
MODELS = {
    "mlp": dict(hidden=(128, 64), dropout=0.1),
    "cnn": dict(channels=(32, 64), dropout=0.1),
}
LR, WEIGHT_DECAY, BETAS = 3.0e-3, 1.0e-2, (0.9, 0.999)
WARMUP, MIN_LR_RATIO, GRAD_CLIP = 20, 0.05, 1.0


def job_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", required=True, help="root with train/ and val/ shard splits")
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--channels", default="32,64", help="SmallCNN widths (cnn only)")
    p.add_argument("--global-size", type=int, required=True)
    p.add_argument("--micro-size", type=int, required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", required=True)
    p.add_argument(
        "--step-flags",
        action="store_true",
        help="diagnostic (raw): one extra all_reduce of 3 flags per step, as ddp.train does",
    )
    return p.parse_args()


def build_model(args: argparse.Namespace, in_features: int) -> torch.nn.Module:
    from ddp.models import MLP, SmallCNN

    if args.model == "mlp":
        return MLP(in_features=in_features, num_classes=10, **MODELS["mlp"])
    channels = tuple(int(c) for c in args.channels.split(","))
    return SmallCNN(
        in_channels=args.in_channels,
        num_classes=10,
        channels=channels,
        dropout=MODELS["cnn"]["dropout"],
    )


def load_split(split_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample of a split in memory, as the model takes it (float, CHW images),
    converted once at load as a hand-written loop would; and the labels."""
    from ddp.data.batch import to_model_input
    from ddp.data.dataset import ShardDataset

    ds = ShardDataset(split_dir)
    batch = ds.fetch(np.arange(len(ds)), np.zeros(len(ds), dtype=bool))
    return to_model_input(batch.inputs), batch.targets


class Wrapped(torch.utils.data.Dataset):
    """The split seen as `length` samples (index modulo N): the epoch padded to whole
    global batches, as ddp's plan does, so every program runs ceil(N/G) steps."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, length: int):
        self.inputs, self.targets, self.length = inputs, targets, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        i %= len(self.targets)
        return self.inputs[i], self.targets[i]


def iterations_per_epoch(num_samples: int, global_size: int) -> int:
    return math.ceil(num_samples / global_size)


def lr_at(step: int, total: int) -> float:
    """warmup_cosine as in conf/schedule/warmup_cosine.yaml (linear warmup, cosine to 5%)."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    t = min(1.0, (step - WARMUP) / max(1, total - WARMUP))
    return LR * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * t)))


def device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_rss_kb() -> int:
    """Peak RSS of this process in KiB (Linux reports ru_maxrss in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def emit(record: dict) -> None:
    """The one machine-readable line a program prints (rank 0): bench/overhead.py parses it."""
    record = {**record, "pid": os.getpid(), "max_rss_kb": max_rss_kb()}
    print(RESULT_PREFIX + json.dumps(record), flush=True)
    sys.stdout.flush()


def exit_now(code: int = 0) -> None:
    """Leave without interpreter finalization, as ddp.distributed.exit_process does: gloo's
    process group torn down by the C++ static destructors aborts the process now and
    then ("terminate called without an active exception"). Same exit path for every
    program, so whole-job wall times compare like with like."""
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def now() -> float:
    return time.time()
