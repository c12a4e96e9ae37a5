"""What the index and the epoch order cost one process, at 2 M, 100 M and 1 B samples.

    python bench/index_bench.py [--sizes 2M,100M,1B] [--repeats 3] [--data DIR] [--v1 DIR]

For each N, one child process reads the manifest, builds the loader's SplitIndex and the
plan (world 8, micro-batch 64, accumulation 2: G = 1,024), then, as rank 1 of epoch 3:

- set-up: imports of the data modules, manifest, index and plan (s);
- first micro-batch at step 0 and at 90% of the epoch: its indices from the order plus
  their shards, offsets and sizes from the index (ms), from a fresh call each;
- peak RSS (VmHWM) after set-up and both seeks, and python + numpy alone beside it;
- steady state: indices per second from the order, one micro-batch after another.

v2 (this checkout) against v1 (the code before manifest v2 and the per-position order:
`git archive e813da4`, unpacked into --v1 unless it is there) where v1 fits in memory:
at 2 M only (v1 at 100 M would need ~25 GB). The 2 M split is a v1 manifest written here
in the layout `ddp-shards index` wrote (400 shards of 5,000 npy+cls samples, no tars),
and its v2 upgrade (`ddp-shards index --upgrade`); 100 M and 1 B are `ddp-shards
synth-index` (10,000 and 100,000 shards of 10,000). Then the commands a user runs:
`ddp-shards order` for one step and `ddp-plan`, wall time and peak RSS from outside,
and with --data-bench, bench/data_bench.py's loader samples/s under v1 and v2.
Everything is printed as markdown, with the machine's load before and after, and written
to bench/results/index-DATE.json (or --json). Goals (issue 18): bench/goals.py's INDEX,
judged at the sizes they name (1B, 2M); a missed goal exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from goals import INDEX, exit_code, judge, print_rows
from results import write

ROOT = Path(__file__).resolve().parent.parent
V1_REV = "e813da4"
SIZES = {"2M": (400, 5000), "100M": (10_000, 10_000), "1B": (100_000, 10_000)}
PLAN = {"world": 8, "micro": 64, "accumulate": 2, "rank": 1, "epoch": 3, "seed": 0}

CHILD = r"""
import json, os, sys, time

def peak_mb():
    with open("/proc/self/status") as f:  # VmHWM: this program's own peak, not the parent's
        return int(f.read().split("VmHWM:")[1].split()[0]) / 1024

start, start_cpu = time.perf_counter(), time.process_time()
import numpy as np
bare = peak_mb()
from ddp.order import rank_micro_batches
from ddp.plan import make_plan
from ddp.shards.manifest import SplitIndex, read_manifest

split, p = sys.argv[1], json.loads(sys.argv[2])
manifest = read_manifest(split)
index = SplitIndex.from_manifest(manifest)
plan = make_plan(manifest.num_samples, p["world"] * p["micro"] * p["accumulate"], p["micro"],
                 p["world"])
set_up, set_up_cpu = time.perf_counter() - start, time.process_time() - start_cpu

def lookup(micro):
    shard_of = index.shard_of  # an array per sample in v1, a search in v2
    shards = shard_of(micro.indices) if callable(shard_of) else shard_of[micro.indices]
    return shards, index.offsets["npy"][micro.indices], index.sizes["npy"][micro.indices]

def seek(step):
    begin = time.perf_counter()
    lookup(next(rank_micro_batches(plan, p["seed"], p["epoch"], p["rank"], start_step=step)))
    return time.perf_counter() - begin

first, at_90 = seek(0), seek(int(0.9 * plan.iterations_per_epoch))
peak = peak_mb()
batches = rank_micro_batches(plan, p["seed"], p["epoch"] + 1, p["rank"])
next(batches)  # v1 builds its permutation here: not the steady state
count, begin = 0, time.perf_counter()
for micro in batches:  # a second of the epoch, or all of it
    count += len(micro.indices)
    if count % 65536 < len(micro.indices) and time.perf_counter() - begin > 1.0:
        break
rate = count / (time.perf_counter() - begin)
print(json.dumps({"set_up": set_up, "set_up_cpu": set_up_cpu, "first": first, "at_90": at_90,
                  "peak_mb": peak, "bare_mb": bare, "rate": rate, "n": manifest.num_samples}))
"""


# --------------------------------------------------------------------------- data


def write_v1_manifest(split: Path, shards: int, per_shard: int) -> None:
    """A version 1 manifest (every key and member offset in the JSON) of npy+cls samples
    laid out as ShardWriter writes them, streamed out shard by shard."""
    split.mkdir(parents=True, exist_ok=True)
    stride, npy_size = 512 + 512 + 512 + 3584, 3200  # cls header+data, npy header+data
    head = {"format": "ddp-shards", "version": 1, "num_samples": shards * per_shard}
    head.update(num_shards=shards, meta={"source": "bench/index_bench.py", "num_classes": 10})
    tmp = split / "manifest.json.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(head, separators=(",", ":"))[:-1] + ',"shards":[')
        for s in range(shards):
            first = s * per_shard
            base = [i * stride for i in range(per_shard)]
            shard = {
                "name": f"shard-{s:06d}.tar",
                "size": per_shard * stride + 1024,
                "sha256": f"{s:064x}",
                "num_samples": per_shard,
                "keys": [f"s{first + i:09d}" for i in range(per_shard)],
                "members": {
                    "cls": {"offsets": [b + 512 for b in base], "sizes": [1] * per_shard},
                    "npy": {"offsets": [b + 1536 for b in base], "sizes": [npy_size] * per_shard},
                },
                "label_ranges": {"cls": [0, 9]},
            }
            f.write(("," if s else "") + json.dumps(shard, separators=(",", ":")))
        f.write("]}")
    os.replace(tmp, split / "manifest.json")


def prepare(data: Path, size: str, code: Path) -> dict[str, Path]:
    """The split of `size` samples per version: {"v1": dir, "v2": dir} (v1 at 2 M only)."""
    shards, per_shard = SIZES[size]
    out = {}
    if size == "2M":
        v1, v2 = data / "2M-v1", data / "2M-v2"
        if not (v1 / "manifest.json").exists():
            write_v1_manifest(v1, shards, per_shard)
        if not (v2 / "manifest.json").exists():
            v2.mkdir(parents=True, exist_ok=True)
            shutil.copy(v1 / "manifest.json", v2 / "manifest.json")
            shards_cli(["index", "--upgrade", str(v2)], code)
        out = {"v1": v1, "v2": v2}
    else:
        v2 = data / f"{size}-synthetic"
        if not (v2 / "manifest.json").exists():
            argv = ["synth-index", str(v2), "--shards", str(shards)]
            shards_cli([*argv, "--samples-per-shard", str(per_shard)], code)
        out = {"v2": v2}
    return out


def shards_cli(argv: list[str], code: Path) -> None:
    run([sys.executable, "-m", "ddp.shards.cli", *argv], code, stdout=subprocess.DEVNULL)


def v1_checkout(path: Path) -> Path:
    """The v1 code, unpacked from git (no worktree: nothing registered in the repo)."""
    if not (path / "ddp" / "order.py").exists():
        path.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", V1_REV], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(path)], input=archive, check=True)
    return path


def env_for(code: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}


def run(cmd: list[str], code: Path, **options) -> subprocess.CompletedProcess:
    """A child running `code`'s ddp: from its own directory, since `python -c` and `-m`
    put the working directory first on sys.path."""
    return subprocess.run(cmd, env=env_for(code), cwd=code, check=True, **options)


# --------------------------------------------------------------------------- measuring


def measure(split: Path, code: Path, repeats: int) -> dict[str, float]:
    """The best of `repeats` children (times: least; rate: most; memory: the first)."""
    runs = []
    for _ in range(repeats):
        cmd = [sys.executable, "-c", CHILD, str(split), json.dumps(PLAN)]
        out = run(cmd, code, capture_output=True, text=True)
        runs.append(json.loads(out.stdout.splitlines()[-1]))
    best = {k: min(r[k] for r in runs) for k in ("set_up", "set_up_cpu", "first", "at_90")}
    return {**runs[0], **best, "rate": max(r["rate"] for r in runs)}


def run_outside(cmd: list[str], code: Path, repeats: int) -> tuple[float, float, float]:
    """(least wall seconds, least CPU seconds, peak RSS MB) of a command, from wait4."""
    walls, cpus, peak = [], [], 0.0
    for _ in range(repeats):
        begin = time.perf_counter()
        child = subprocess.Popen(cmd, env=env_for(code), cwd=code, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        walls.append(time.perf_counter() - begin)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            raise SystemExit(f"{' '.join(cmd)}: exit {child.returncode}")
        cpus.append(usage.ru_utime + usage.ru_stime)
        peak = max(peak, usage.ru_maxrss / 1024)
    return min(walls), min(cpus), peak


def order_cmd(split: Path) -> list[str]:
    p = PLAN
    return [
        *(sys.executable, "-m", "ddp.shards.cli", "order", str(split)),
        *("--epoch", str(p["epoch"]), "--rank", str(p["rank"])),
        *("--world-size", str(p["world"]), "--micro-size", str(p["micro"])),
        *("--accumulate", str(p["accumulate"]), "--steps", "0:1"),
    ]


def plan_cmd(split: Path) -> list[str]:
    p = PLAN
    global_size = p["world"] * p["micro"] * p["accumulate"]
    return [
        *(sys.executable, "-m", "ddp.plan_cli"),
        *(f"data.root={split.parent}", f"data.train_split={split.name}"),
        *(f"batch.micro_size={p['micro']}", f"batch.global_size={global_size}"),
        f"world_size={p['world']}",
    ]


DATA_BENCH = """
import sys, time
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[1])
import data_bench
from ddp.data.loaders import build_train_loader
from ddp.plan import make_plan
torch.set_num_threads(1)
split = data_bench.prepare(Path(sys.argv[2]), "npy", 50_000)
plan = make_plan(50_000, data_bench.MICRO, data_bench.MICRO, 1)
loader = build_train_loader(split, plan, 0, 0, data_bench.options("npy", int(sys.argv[3])))
walls, cpus = [], []
for epoch in range(6):  # the first warms the page cache and the code
    wall, cpu = time.perf_counter(), time.process_time()
    seen = sum(len(batch) for batch in loader.epoch(epoch))
    walls.append(seen / (time.perf_counter() - wall))
    cpus.append(seen / (time.process_time() - cpu))
print(max(walls[1:]), max(cpus[1:]))
"""


def data_bench(code: Path, data: Path, in_memory_mb: int) -> tuple[float, float]:
    """The samples/s of bench/data_bench.py's "ddp full shuffle" (npy: its shards, plan
    and loader options) under `code`: best of 5 epochs by wall time, and by CPU time
    (which the neighbours of a shared machine disturb less)."""
    cmd = [sys.executable, "-c", DATA_BENCH, str(ROOT / "bench"), str(data), str(in_memory_mb)]
    wall, cpu = run(cmd, code, capture_output=True, text=True).stdout.split()[-2:]
    return float(wall), float(cpu)


def data_bench_rows(v1: Path, v2: Path, data: Path, repeats: int) -> dict:
    """v1 and v2 in turns, `repeats` times each, the best kept: on a shared machine the
    slower runs measure the neighbours (memory bandwidth above all)."""
    print(
        "\n| data_bench.py, npy, ddp full shuffle | v1 samples/s (wall / CPU) "
        "| v2 samples/s (wall / CPU) | v2 / v1 (wall / CPU) | v2 / v1, median of pairs (CPU) |"
    )
    print("| --- | --- | --- | --- | --- |")
    rows = {}
    for label, mb in (("in memory (the default)", 256), ("from the shards", 0)):
        old, new = [], []
        for _ in range(repeats):
            old.append(data_bench(v1, data / "data-bench-v1", mb))
            new.append(data_bench(v2, data / "data-bench-v2", mb))
        (ow, oc), (nw, nc) = [[max(r[i] for r in runs) for i in (0, 1)] for runs in (old, new)]
        paired = statistics.median(n[1] / o[1] for o, n in zip(old, new, strict=True))
        print(
            f"| {label} | {ow:,.0f} / {oc:,.0f} | {nw:,.0f} / {nc:,.0f} "
            f"| {nw / ow:.2f} / {nc / oc:.2f} | {paired:.2f} |"
        )
        rows[label] = {
            "v1 samples/s (wall, CPU)": (ow, oc),
            "v2 samples/s (wall, CPU)": (nw, nc),
            "v2 / v1, median of pairs (CPU)": paired,
        }
    return rows


# --------------------------------------------------------------------------- report


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:,.1f}×" if a and b else "—"


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} CPUs"


def print_order_table(rows: list[tuple]) -> None:
    print(
        "| N | code | set-up, wall / CPU (s) | peak RSS (MB) | first micro-batch, step 0 (ms) "
        "| at 90% (ms) | order, steady (indices/s) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    per_sample = next((old["peak_mb"] / old["n"] for _, old, _, _ in rows if old), None)
    for size, old, new, split in rows:
        for version, r in (("v1", old), ("v2", new)):
            if r is None:
                guess = f" ≈ {per_sample * new['n'] / 1024:,.0f} GB" if per_sample else ""
                print(f"| {size} | v1 | — | not run{guess} | — | — | — |")
                continue
            label = f"{version} (synthetic)" if "synthetic" in split.name else version
            set_up = f"{r['set_up']:.2f} / {r['set_up_cpu']:.2f}"
            print(
                f"| {size} | {label} | {set_up} | {r['peak_mb']:,.0f} "
                f"| {r['first'] * 1e3:,.2f} | {r['at_90'] * 1e3:,.2f} | {r['rate']:,.0f} |"
            )
        if old is not None:
            cells = [ratio(old[k], new[k]) for k in ("set_up_cpu", "peak_mb", "first", "at_90")]
            rate = ratio(new["rate"], old["rate"])
            print(f"| {size} | **v1 / v2** | {' | '.join(cells)} | {rate} (v2 / v1) |")


def goals(rows: list[tuple], commands: list[tuple]) -> list[dict]:
    """INDEX's goals, judged where their size ran (n/a elsewhere)."""
    at_1b = next((new for size, _, new, _ in rows if size == "1B"), None)
    order_2m = next(
        (wall for size, name, version, wall, *_ in commands
         if (size, name, version) == ("2M", "ddp-shards order, one step", "v2")),
        None,
    )  # fmt: skip
    figures = {
        "1B: set-up s": at_1b and at_1b["set_up"],
        "1B: peak RSS MB": at_1b and at_1b["peak_mb"],
        "1B: first micro-batch ms, any step": at_1b and max(at_1b["first"], at_1b["at_90"]) * 1e3,
        "2M: `ddp-shards order`, one step s": order_2m,
    }
    return [judge(name, goal, figures[name]) for name, goal in INDEX.items()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2M,100M,1B")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "ddp-index")
    parser.add_argument("--v1", type=Path, default=Path(tempfile.gettempdir()) / f"ddp-{V1_REV}")
    parser.add_argument("--data-bench", action="store_true", help="also bench/data_bench.py")
    parser.add_argument("--json", type=Path, help="the results file (default: bench/results/)")
    args = parser.parse_args()
    v2, args.data = ROOT, args.data.resolve()
    v1 = v1_checkout(args.v1.resolve()) if "2M" in args.sizes or args.data_bench else None
    before = load()
    print(f"before: {before}\n")
    rows, commands = [], []
    for size in args.sizes.split(","):
        splits = prepare(args.data, size, v2)
        got = {
            version: measure(split, v1 if version == "v1" else v2, args.repeats)
            for version, split in splits.items()
        }
        rows.append((size, got.get("v1"), got["v2"], splits["v2"]))
        for version, split in splits.items():
            code = v1 if version == "v1" else v2
            for name, cmd in (("ddp-shards order, one step", order_cmd), ("ddp-plan", plan_cmd)):
                commands.append((size, name, version, *run_outside(cmd(split), code, args.repeats)))

    print_order_table(rows)
    bare = statistics.median(r[2]["bare_mb"] for r in rows)
    print(f"\npython + numpy alone: {bare:.0f} MB of the peak RSS.\n")
    print("| N | command | code | wall (s) | CPU (s) | peak RSS (MB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for size, name, version, wall, cpu, peak in commands:
        print(f"| {size} | `{name}` | {version} | {wall:.2f} | {cpu:.2f} | {peak:,.0f} |")
    loader = data_bench_rows(v1, v2, args.data, args.repeats) if args.data_bench else None
    after = load()
    print(f"\nafter: {after}; best of {args.repeats} runs per cell")
    judged = goals(rows, commands)
    print_rows(judged)
    columns = ("size", "v1", "v2", "split")
    numbers = {
        "options": {"sizes": args.sizes, "repeats": args.repeats, "plan": PLAN},
        "load": {"before": before, "after": after},
        "order": [dict(zip(columns, row, strict=True)) for row in rows],
        "python_numpy_mb": bare,
        "commands": [
            dict(zip(("size", "command", "code", "wall_s", "cpu_s", "peak_mb"), c, strict=True))
            for c in commands
        ],
        "data_bench": loader,
        "goals": judged,
    }
    write("index", numbers, args.json)
    return exit_code(judged)


if __name__ == "__main__":
    sys.exit(main())
