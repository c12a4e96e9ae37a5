"""What watching where the time goes costs (ddp.perf, issue 26), in one process.

    OMP_NUM_THREADS=1 python bench/perf_bench.py [--repeats 5] [--blocks 100] [--json PATH]

The trainer's step (forward, backward, AdamW update) of the digits MLP (64-128-64-10,
micro-batch 32: overhead-bound, the worst case) and of the small CNN (16-32 channels,
32x32x3, micro-batch 64), plain and wrapped in the marks the loop makes
(`Watch.begin_step`, three parts, the hook's mark, `end_step`, a logging interval every
10 steps), in alternating blocks of steps of the same model (`--blocks` per repeat: 20
steps each for the MLP, 2 for the CNN), `--repeats` times; the table holds the median
steps/s of each and the median of the per-repeat ratios (watched / plain). Also: one epoch's figures
(`Watch.epoch_metrics`, one process) in microseconds, and the FLOP count at start-up
(`count_flops_per_sample`) in a fresh process, first and second call.

Goal: bench/goals.py's PERF (watched / plain steps/s). The summary and the machine go to
bench/results/perf-DATE.json (or --json).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from goals import PERF, exit_code, judge, print_rows  # noqa: E402
from results import write  # noqa: E402

from ddp.models import MLP, SmallCNN  # noqa: E402
from ddp.perf.timing import StepTimer  # noqa: E402
from ddp.perf.trace import StepTrace  # noqa: E402
from ddp.perf.watch import Watch  # noqa: E402

CPU = torch.device("cpu")


class OneProcess:
    device, world_size, distributed, rank = CPU, 1, False, 0


def case(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if name == "mlp":
        return MLP(64, 10, hidden=(128, 64)), torch.rand(32, 1, 8, 8), torch.randint(10, (32,))
    model = SmallCNN(3, 10, (16, 32)).to(memory_format=torch.channels_last)
    inputs = torch.rand(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    return model, inputs, torch.randint(10, (64,))


def interleaved(name: str, blocks: int, block_steps: int) -> tuple[float, float]:
    """Steps/s plain and watched of one model, in alternating blocks of `block_steps`
    steps (plain, watched, watched, plain, ...), so that a slow phase of a shared
    machine (seconds long) falls on both alike."""
    model, inputs, targets = case(name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    watch, number = new_watch(), 0

    def step() -> None:
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def watched_step() -> None:
        nonlocal number
        number += 1
        watch.begin_step(number)
        with watch.part("data"):
            pass
        with watch.part("forward_backward"):
            loss = F.cross_entropy(model(inputs), targets)
            loss.backward()
            watch.grads_ready()
        with watch.part("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        watch.end_step()
        if number % 10 == 0:
            watch.interval_metrics()

    for _ in range(10):  # warm-up
        step()
    seconds = {step: 0.0, watched_step: 0.0}
    for block in range(blocks):
        kinds = (step, watched_step) if block % 2 == 0 else (watched_step, step)
        for kind in kinds:
            start = time.perf_counter()
            for _ in range(block_steps):
                kind()
            seconds[kind] += time.perf_counter() - start
    total = blocks * block_steps
    return total / seconds[step], total / seconds[watched_step]


def new_watch() -> Watch:
    trace = StepTrace(None, Path("/nonexistent"), 0, CPU)
    return Watch(StepTimer(CPU), trace, OneProcess(), 1e5, None, [])


def epoch_figures_us(repeats: int = 200) -> float:
    watch = new_watch()
    start = time.perf_counter()
    for _ in range(repeats):
        watch.epoch_metrics(1000.0)
    return (time.perf_counter() - start) / repeats * 1e6


FLOP_COUNT = """
import time, torch
from ddp.models import MLP
from ddp.perf.flops import count_flops_per_sample
model, x = MLP(64, 10, hidden=(128, 64)), torch.rand(32, 1, 8, 8)
t0 = time.perf_counter(); count_flops_per_sample(model, x); t1 = time.perf_counter()
count_flops_per_sample(model, x); t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def flop_count_s() -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, "-c", FLOP_COUNT], cwd=ROOT, capture_output=True, text=True, check=True
    )
    first, second = map(float, out.stdout.split())
    return first, second


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--blocks", type=int, default=100, help="alternating blocks per repeat")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows, summary = [], {}
    for name in ("mlp", "cnn"):
        block_steps = 20 if name == "mlp" else 2
        plain, watched, ratios = [], [], []
        for _ in range(args.repeats):
            a, b = interleaved(name, args.blocks, block_steps)
            plain.append(a)
            watched.append(b)
            ratios.append(b / a)
        summary[name] = {
            "plain_steps_per_s": statistics.median(plain),
            "watched_steps_per_s": statistics.median(watched),
            "watched/plain": statistics.median(ratios),
            "ratios": ratios,
        }
        rows.append(judge(f"{name}: steps/s watched/plain", PERF, summary[name]["watched/plain"]))
    summary["epoch_figures_us"] = epoch_figures_us()
    first, second = flop_count_s()
    summary["flop_count_s"] = {"first": first, "second": second}

    print("== watching the steps (cpu, 1 process, 1 thread; medians) ==")
    print(f"{'case':<5} {'plain steps/s':>14} {'watched steps/s':>16} {'watched/plain':>14}")
    for name in ("mlp", "cnn"):
        s = summary[name]
        print(
            f"{name:<5} {s['plain_steps_per_s']:>14.1f} {s['watched_steps_per_s']:>16.1f} "
            f"{s['watched/plain']:>14.3f}"
        )
    print(f"an epoch's figures (Watch.epoch_metrics): {summary['epoch_figures_us']:.0f} us")
    print(f"the FLOP count at start-up: {first:.2f} s first call, {second * 1e3:.1f} ms after")
    print_rows(rows)
    write("perf", {**summary, "goals": rows}, args.json)
    return exit_code(rows)


if __name__ == "__main__":
    sys.exit(main())
