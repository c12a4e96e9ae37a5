"""Trainer overhead: ddp.train vs a minimal hand-written DDP loop vs Lightning's Trainer.

    python bench/overhead.py [--quick] [--json out.json] [--repeats 3]

Same model, shards, global batch, micro-batch, process count, seed and epochs for
every program; all three are launched by torchrun through bench/overhead_rss.py
(which records each rank's peak RSS), alternately (ours, raw, lightning, ours, ...),
`--repeats` times. Programs:

- ours:          torchrun -m ddp.train, W&B offline (the default logger);
- ours-nowandb:  the same with logger.wandb.enabled=false;
- ours-nchw:     (cnn only) the same with trainer.channels_last=false: what the
                 channels-last memory order brings;
- ours-nonoise:  the same with trainer.noise_scale=false: what measuring the gradient
                 noise scale costs (not run unless --programs names it);
- raw:           bench/raw_ddp.py (samples in memory, DistributedSampler, no_sync);
- lightning:     bench/lightning_ddp.py (Trainer, strategy="ddp", its defaults);
- candidate:     with `--candidate DIR`, ddp.train run from another checkout (a proposed
                 change), W&B offline; reported against ours and raw.

Cases: `mlp` on data/digits (overhead-bound; G=64, micro 16, 8 epochs) and `cnn`
(SmallCNN, widths 16,32 by default to keep a CPU run short: --cnn-channels 32,64 for
the config's own) on a synthetic 10,000-sample 32x32x3 set (compute-bound; G=256,
micro 64, 3 epochs), made with `ddp-shards prepare synthetic` on first use.
Measured per run: steady-state steps/s over epochs 1.. (epoch 0 is warm-up), as steps
per epoch over the median epoch, both per whole epoch (train + validation + per-epoch
checkpoint/logging: between the ends of consecutive validations) and for the train
loop alone; whole-job wall time (launch to exit) and CPU seconds per rank (far less
disturbed by a busy machine than wall time); launch to the first optimizer step
(ddp.train logs it in a separate short run, `ours-startup`); peak RSS per rank. Also:
the import time of ddp.train, and (cnn) scaling from 1 process to all of them.

CPU: 2 processes, gloo, OMP_NUM_THREADS=1 each. CUDA: one process per GPU, nccl;
the table reports GPU samples/s. Ratios are medians of ratios taken within each
repeat, so slow phases of a shared machine hit both sides of a ratio.

Goals: bench/goals.py's OVERHEAD (per case) and SCALING; a missed goal exits 1. Every run,
the summary and the machine go to bench/results/overhead[-quick]-DATE.json (or --json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
from goals import OVERHEAD, SCALING, exit_code, judge, print_rows  # noqa: E402
from overhead_common import RESULT_PREFIX  # noqa: E402
from results import write  # noqa: E402

PROGRAMS = ("ours", "raw", "lightning", "ours-nowandb", "ours-nchw")
OPTIONAL_PROGRAMS = ("ours-nonoise",)


@dataclass
class Case:
    name: str
    model: str
    data: Path
    global_size: int
    micro_size: int
    epochs: int
    in_channels: int = 1
    channels: str | None = None
    """SmallCNN widths (cnn only)."""


@dataclass
class Run:
    case: str
    program: str
    repeat: int
    nproc: int
    wall_s: float = 0.0
    first_step_s: float | None = None
    steps_per_epoch: int = 0
    samples_per_epoch: int = 0
    epoch_end_times: list[float] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    max_rss_kb: list[int] = field(default_factory=list)
    """Per rank, in rank order."""
    cpu_s: list[float] = field(default_factory=list)
    """Per rank: CPU seconds (user + system) of the whole job."""
    failures: list[str] = field(default_factory=list)
    """Logs of failed attempts before this one."""

    def steps_per_s(self) -> float | None:
        """Whole epochs after the first (train + validation + per-epoch side effects):
        steps per epoch over the median time between the ends of two validations
        (the median shrugs off a stall of a shared machine)."""
        times = self.epoch_end_times
        if len(times) < 2:
            return None
        return self.steps_per_epoch / statistics.median(
            b - a for a, b in zip(times, times[1:], strict=False)
        )

    def train_steps_per_s(self) -> float | None:
        """The train loop alone: steps per epoch over the median epoch (after the first)."""
        if len(self.train_seconds) < 2:
            return None
        return self.steps_per_epoch / statistics.median(self.train_seconds[1:])

    def summary(self) -> dict:
        return {
            **asdict(self),
            "steps_per_s": self.steps_per_s(),
            "train_steps_per_s": self.train_steps_per_s(),
        }


# ------------------------------------------------------------------------ launching


def torchrun(nproc: int, rss_dir: Path, command: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(BENCH / "overhead_rss.py"),
        str(rss_dir),
        "--",
        sys.executable,
        *command,
    ]


def trainer_like(program: str) -> bool:
    """Programs that run ddp.train (this checkout's or the candidate's)."""
    return program.startswith(("ours", "candidate"))


def program_command(program: str, case: Case, run_dir: Path) -> list[str]:
    if trainer_like(program):
        overrides = [
            f"model={case.model}",
            f"model.in_channels={case.in_channels}",
            f"data.root={case.data}",
            f"batch.global_size={case.global_size}",
            f"batch.micro_size={case.micro_size}",
            f"trainer.max_epochs={case.epochs}",
            "trainer.seed=0",
            "trainer.progress=false",
            "plateau=none",  # report only: every program runs all its epochs
            f"run.root={run_dir.parent}",
            f"run.name={run_dir.name}",
        ]
        if case.model == "mlp":
            overrides.remove(f"model.in_channels={case.in_channels}")
        if case.channels:
            overrides.append(f"model.channels=[{case.channels}]")
        if program == "ours-nowandb":
            overrides.append("logger.wandb.enabled=false")
        if program == "ours-nchw":  # what channels-last memory order brings to the CNN
            overrides.append("trainer.channels_last=false")
        if program == "ours-nonoise":  # what measuring the noise scale costs
            overrides.append("trainer.noise_scale=false")
        if program.endswith("-startup"):  # ends after its first step, which it logs
            overrides += ["trainer.max_steps=1", "trainer.log_every_steps=1"]
        return ["-m", "ddp.train", *overrides]
    script = {"raw": "raw_ddp.py", "lightning": "lightning_ddp.py"}[program]
    args = [
        str(BENCH / script),
        f"--data={case.data}",
        f"--model={case.model}",
        f"--in-channels={case.in_channels}",
        f"--global-size={case.global_size}",
        f"--micro-size={case.micro_size}",
        f"--epochs={case.epochs}",
        "--seed=0",
        f"--run-dir={run_dir}",
    ]
    if case.channels:
        args.append(f"--channels={case.channels}")
    return args


def run_once(
    case: Case, program: str, repeat: int, nproc: int, work: Path, cwd: Path = ROOT
) -> Run:
    """One job; a job that fails is run once more (a shared machine, gloo's teardown),
    and the failure is kept in Run.failures."""
    try:
        return _run_once(case, program, repeat, nproc, work, cwd)
    except RuntimeError as err:
        print(f"  retrying after a failure: {str(err).splitlines()[0]}", flush=True)
        run = _run_once(case, program, repeat, nproc, work, cwd)
        run.failures.append(str(err)[-2000:])
        return run


def _run_once(case: Case, program: str, repeat: int, nproc: int, work: Path, cwd: Path) -> Run:
    name = f"{case.name}-{program}-n{nproc}-r{repeat}"
    run_dir, rss_dir = work / "runs" / name, work / "rss" / name
    for path in (run_dir, rss_dir):
        shutil.rmtree(path, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    command = torchrun(nproc, rss_dir, program_command(program, case, run_dir))
    start = time.time()
    with open(log, "w") as out:
        code = subprocess.run(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT
        ).returncode
    wall = time.time() - start
    text = log.read_text(errors="replace")
    if code != 0:
        raise RuntimeError(f"{name} exited {code}; log {log}:\n{text[-3000:]}")
    run = Run(case.name, program, repeat, nproc, wall_s=wall)
    if trainer_like(program):
        parse_ours(run, run_dir / "metrics.jsonl", start)
    else:
        parse_result_line(run, text, start)
    ranks = sorted(rss_dir.glob("rss-rank*.json"), key=lambda p: int(p.stem[8:]))
    records = [json.loads(p.read_text()) for p in ranks]
    run.max_rss_kb = [r["max_rss_kb"] for r in records]
    run.cpu_s = [r["cpu_s"] for r in records]
    return run


def parse_ours(run: Run, metrics: Path, start: float) -> None:
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    plan = next(r for r in records if r["kind"] == "plan")
    run.steps_per_epoch = plan["iterations_per_epoch"]
    run.samples_per_epoch = plan["samples_per_epoch"]
    vals = [r for r in records if r["kind"] == "val"]
    run.epoch_end_times = [r["time"] for r in vals]
    run.train_seconds = [run.samples_per_epoch / r["train/samples_per_s"] for r in vals]
    first = next((r for r in records if r["kind"] == "train" and r["step"] == 1), None)
    if first is not None:  # only with trainer.log_every_steps=1 (the ours-startup run)
        run.first_step_s = first["time"] - start


def parse_result_line(run: Run, text: str, start: float) -> None:
    line = next(ln for ln in reversed(text.splitlines()) if ln.startswith(RESULT_PREFIX))
    result = json.loads(line[len(RESULT_PREFIX) :])
    run.steps_per_epoch = result["steps_per_epoch"]
    run.samples_per_epoch = result["samples_per_epoch"]
    run.epoch_end_times = result["epoch_end_times"]
    run.train_seconds = result["train_seconds"]
    run.first_step_s = result["first_step_time"] - start


# ------------------------------------------------------------------------ import time


def import_times(repeats: int, candidate: Path | None = None) -> dict:
    """Wall and CPU seconds of `python -c "import X"` (median), alternating, and
    ddp.train's heaviest imports by -X importtime cumulative time."""
    targets = {
        "torch": ("import torch", ROOT),
        "ddp.train": ("import ddp.train", ROOT),
        "lightning": ("import lightning.pytorch", ROOT),
    }
    if not has_lightning():
        del targets["lightning"]
    if candidate:
        targets["candidate"] = ("import ddp.train", candidate)
    times: dict[str, list[float]] = {k: [] for k in targets}
    cpu: dict[str, list[float]] = {k: [] for k in targets}
    for _ in range(repeats):
        for name, (code, cwd) in targets.items():
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], cwd=cwd, check=True)
            times[name].append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[name].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    err = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import ddp.train"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    cumulative = {}
    for line in err.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m and len(m.group(3)) <= 3:  # top-level imports and their direct children
            cumulative[m.group(4)] = int(m.group(2)) / 1e6
    heaviest = dict(sorted(cumulative.items(), key=lambda kv: -kv[1])[:8])
    return {
        "wall_s": {k: statistics.median(v) for k, v in times.items()},
        "cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
        "ddp_train_heaviest_cumulative_s": heaviest,
    }


def has_lightning() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) for m in ("lightning", "pytorch_lightning"))


# ------------------------------------------------------------------------ data


def ensure_data(case: Case, num_samples: int) -> None:
    if (case.data / "train" / "manifest.json").exists():
        return
    if case.model == "mlp":
        cmd = ["prepare", "digits", "--out", str(case.data)]
    else:
        cmd = [
            "prepare",
            "synthetic",
            "--num-samples",
            str(num_samples),
            "--shape",
            "32,32,3",
            "--out",
            str(case.data),
        ]
    subprocess.run([sys.executable, "-m", "ddp.shards.cli", *cmd], cwd=ROOT, check=True)


# ------------------------------------------------------------------------ report


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def paired_ratio(runs: list[Run], a: str, b: str, metric, case: str, nproc: int) -> float | None:
    """Median over repeats of metric(a) / metric(b), both from the same repeat."""
    ratios = []
    for rep in sorted({r.repeat for r in runs}):
        pick = {
            r.program: metric(r)
            for r in runs
            if r.repeat == rep and r.case == case and r.nproc == nproc
        }
        if pick.get(a) is not None and pick.get(b):
            ratios.append(pick[a] / pick[b])
    return median(ratios)


METRICS = {
    "steady steps/s (whole epochs)": (lambda r: r.steps_per_s(), "{:.2f}"),
    "steady steps/s (train loop)": (lambda r: r.train_steps_per_s(), "{:.2f}"),
    "steady samples/s (whole epochs)": (
        lambda r: r.steps_per_s() and r.steps_per_s() * r.samples_per_epoch / r.steps_per_epoch,
        "{:,.0f}",
    ),
    "whole-job wall s": (lambda r: r.wall_s, "{:.2f}"),
    "whole-job CPU s (max rank)": (lambda r: max(r.cpu_s) if r.cpu_s else None, "{:.2f}"),
    "launch -> first step s": (lambda r: r.first_step_s, "{:.2f}"),
    "peak RSS MiB (max rank)": (
        lambda r: max(r.max_rss_kb) / 1024 if r.max_rss_kb else None,
        "{:.0f}",
    ),
    "peak RSS MiB (rank 1)": (
        lambda r: r.max_rss_kb[1] / 1024 if len(r.max_rss_kb) > 1 else None,
        "{:.0f}",
    ),
}


def startup_times(runs: list[Run], case: str, program: str) -> list[float]:
    return [r.first_step_s for r in runs if r.case == case and r.program == f"{program}-startup"]


def ratio_pairs(programs: list[str]) -> list[tuple[str, str]]:
    pairs = [("ours", o) for o in ("raw", "lightning", "ours-nonoise") if o in programs]
    pairs += [("candidate", o) for o in ("ours", "raw") if o in programs]
    return [(a, b) for a, b in pairs if a in programs]


def summarize(runs: list[Run], cases: list[Case], programs: list[str], nproc: int) -> dict:
    summary: dict = {}
    for case in cases:
        c = summary[case.name] = {}
        mine = [r for r in runs if r.case == case.name and r.nproc == nproc]
        for label, (metric, _) in METRICS.items():
            row = {}
            for p in programs:
                values = [metric(r) for r in mine if r.program == p]
                if label.startswith("launch") and trainer_like(p):
                    # the trainer's first step comes from its own short run (which logs step 1)
                    values = startup_times(runs, case.name, p)
                row[p] = median(values)
            for a, b in ratio_pairs(programs):
                if label.startswith("launch"):  # the trainer's from separate runs: medians
                    row[f"{a}/{b}"] = row[a] / row[b] if row[a] and row[b] else None
                else:
                    row[f"{a}/{b}"] = paired_ratio(mine, a, b, metric, case.name, nproc)
            c[label] = row
    return summary


def scaling(runs: list[Run], case: str, nproc: int, programs: list[str]) -> dict:
    out = {}
    for p in programs:
        one = median(
            r.steps_per_s() for r in runs if r.case == case and r.program == p and r.nproc == 1
        )
        many = median(
            r.steps_per_s() for r in runs if r.case == case and r.program == p and r.nproc == nproc
        )
        out[p] = {
            "steps_per_s_1": one,
            f"steps_per_s_{nproc}": many,
            "scaling": many / one if one and many else None,
        }
    o, r = out["ours"]["scaling"], out["raw"]["scaling"]
    out["ours/raw"] = o / r if o and r else None
    return out


GOAL_FIGURES = {
    "steps/s ours/raw": ("steady steps/s (whole epochs)", "ours/raw"),
    "steps/s ours/lightning": ("steady steps/s (whole epochs)", "ours/lightning"),
    "whole-job wall ours/raw": ("whole-job wall s", "ours/raw"),
    "peak RSS ours/raw": ("peak RSS MiB (max rank)", "ours/raw"),
}
"""The figure of the summary each of goals.OVERHEAD judges: (metric, ratio)."""


def goals(summary: dict, scale: dict | None) -> list[dict]:
    rows = []
    for case, c in summary.items():
        for name, goal in OVERHEAD.items():
            metric, ratio = GOAL_FIGURES[name]
            if ratio == "ours/lightning" and ratio not in c[metric]:
                continue  # Lightning did not run
            rows.append(judge(f"{case}: {name}", goal, c[metric].get(ratio)))
    if scale:
        rows.append(judge("cnn: scaling 1->N ours/raw", SCALING, scale.get("ours/raw")))
    return rows


def fmt(value, pattern="{:.2f}") -> str:
    return "-" if value is None else pattern.format(value)


def print_table(summary, programs, scale, nproc, imports, goal_rows, device) -> None:
    ratio_cols = [f"{a}/{b}" for a, b in ratio_pairs(programs)]
    cols = [*programs, *ratio_cols]
    print(
        f"\n== overhead ({device}, {nproc} processes; medians; ratios are medians of "
        f"per-repeat ratios) =="
    )
    head = f"{'case':<5} {'metric':<32}" + "".join(f" {c:>14}" for c in cols)
    print(head)
    print("-" * len(head))
    for case, c in summary.items():
        for label, row in c.items():
            pattern = METRICS[label][1]
            cells = [fmt(row.get(p), pattern) for p in programs]
            cells += [fmt(row.get(r), "{:.3f}") for r in ratio_cols]
            print(f"{case:<5} {label:<32}" + "".join(f" {x:>14}" for x in cells))
    if scale:
        print(f"\n== scaling, cnn, 1 -> {nproc} processes (steady steps/s, whole epochs) ==")
        for p in [p for p in scale if p != "ours/raw"]:
            s = scale[p]
            print(
                f"{p:<10} 1: {fmt(s['steps_per_s_1'])}  {nproc}: {fmt(s[f'steps_per_s_{nproc}'])}"
                f"  scaling {fmt(s['scaling'], '{:.3f}')}"
            )
        print(f"ours scaling / raw scaling: {fmt(scale['ours/raw'], '{:.3f}')}")
    print("\n== import time (python -c 'import X'; median wall s, CPU s) ==")
    for name, value in imports["wall_s"].items():
        print(f"{name:<12} {value:6.2f} {imports['cpu_s'][name]:6.2f}")
    print(
        "ddp.train heaviest imports (cumulative s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in imports["ddp_train_heaviest_cumulative_s"].items())
    )
    print_rows(goal_rows)


# ------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="smoke mode: mlp only, 2 epochs, 1 repeat, no scaling"
    )
    p.add_argument(
        "--json", type=Path, help="write every run and the summary here (default: bench/results/)"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--programs",
        default=",".join(PROGRAMS),
        help=f"comma-separated subset of {','.join(PROGRAMS + OPTIONAL_PROGRAMS)}",
    )
    p.add_argument("--cases", default="mlp,cnn")
    p.add_argument("--work", type=Path, default=Path("/tmp/ddp-overhead"))
    p.add_argument("--nproc", type=int, help="processes (default: GPU count, else 2)")
    p.add_argument("--mlp-epochs", type=int, default=8)
    p.add_argument("--cnn-epochs", type=int, default=3)
    p.add_argument(
        "--cnn-channels",
        default="16,32",
        help="SmallCNN widths for the cnn case (the config's default is 32,64)",
    )
    p.add_argument("--cnn-samples", type=int, default=10000)
    p.add_argument("--no-scaling", action="store_true")
    p.add_argument(
        "--candidate",
        type=Path,
        help="another checkout of this repo: its ddp.train runs as program 'candidate'",
    )
    args = p.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    nproc = args.nproc or (torch.cuda.device_count() if cuda else 2)
    device = f"cuda x{nproc} ({torch.cuda.get_device_name(0)}), nccl" if cuda else "cpu, gloo"
    programs = [x for x in args.programs.split(",") if x]
    if "candidate" in programs and not args.candidate:
        p.error("program 'candidate' needs --candidate DIR")
    if args.candidate and "candidate" not in programs:
        programs.insert(programs.index("ours") + 1 if "ours" in programs else 0, "candidate")
    if "lightning" in programs and not has_lightning():
        print("lightning is not installed (pip install -e '.[bench]'): skipping it")
        programs.remove("lightning")
    case_names = ["mlp"] if args.quick else args.cases.split(",")
    repeats = 1 if args.quick else args.repeats
    work = args.work
    data_root = ROOT / "data" / "digits"
    cases = {
        "mlp": Case(
            "mlp",
            "mlp",
            data_root if (data_root / "train").exists() else work / "digits",
            global_size=64,
            micro_size=16,
            epochs=2 if args.quick else args.mlp_epochs,
        ),
        "cnn": Case(
            "cnn",
            "cnn",
            work / f"synthetic-{args.cnn_samples}-32x32x3",
            global_size=256,
            micro_size=64,
            epochs=args.cnn_epochs,
            in_channels=3,
            channels=args.cnn_channels,
        ),
    }
    cases = [cases[c] for c in case_names]
    # G must be a multiple of micro x processes: shrink the micro-batch for many GPUs.
    for case in cases:
        while case.global_size % (case.micro_size * nproc):
            case.micro_size //= 2
    for case in cases:
        ensure_data(case, args.cnn_samples)

    runs: list[Run] = []
    t_start = time.time()

    def go(case: Case, program: str, rep: int, n: int) -> None:
        cwd = args.candidate.resolve() if program.startswith("candidate") else ROOT
        run = run_once(case, program, rep, n, work, cwd)
        runs.append(run)
        print(
            f"  {case.name:<4} {program:<17} n={n} rep {rep}: wall {run.wall_s:6.2f}s  "
            f"steps/s {fmt(run.steps_per_s())}  train steps/s {fmt(run.train_steps_per_s())}  "
            f"first step {fmt(run.first_step_s)}s  rss {[k // 1024 for k in run.max_rss_kb]} MiB",
            flush=True,
        )

    for rep in range(repeats):
        for case in cases:
            for program in programs:
                if program == "ours-nchw" and case.model != "cnn":
                    continue  # no convolution: the very same job as ours
                go(case, program, rep, nproc)
            if case.name == "mlp":  # start-up: the trainer logs its first step in a short run
                for program in ("ours", "candidate"):
                    if program in programs:
                        go(case, f"{program}-startup", rep, nproc)
    do_scaling = (
        not args.quick and not args.no_scaling and nproc > 1 and any(c.name == "cnn" for c in cases)
    )
    scale = None
    if do_scaling:
        cnn = next(c for c in cases if c.name == "cnn")
        scaled = ["ours", *(["ours-nchw"] if "ours-nchw" in programs else []), "raw"]
        for rep in range(repeats):
            for program in scaled:
                go(cnn, program, rep, 1)
        scale = scaling(runs, "cnn", nproc, scaled)
    candidate = args.candidate.resolve() if args.candidate else None
    imports = import_times(1 if args.quick else repeats, candidate)
    summary = summarize(runs, cases, programs, nproc)
    goal_rows = goals(summary, scale)
    print_table(summary, programs, scale, nproc, imports, goal_rows, device)
    print(f"\n{len(runs)} runs in {time.time() - t_start:.0f}s; logs in {work / 'logs'}")
    numbers = {
        "machine": {"device": device, "nproc": nproc},
        "options": {k: str(v) for k, v in vars(args).items()},
        "cases": [{k: str(v) for k, v in asdict(c).items()} for c in cases],
        "runs": [r.summary() for r in runs],
        "summary": summary,
        "scaling": scale,
        "import_time": imports,
        "goals": goal_rows,
    }
    write("overhead-quick" if args.quick else "overhead", numbers, args.json)
    return exit_code(goal_rows)


if __name__ == "__main__":
    sys.exit(main())
