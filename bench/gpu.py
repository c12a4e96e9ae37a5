"""ddp on a GPU, against what the GPU can do: one command, one table.

    python bench/gpu.py [--parts resnet18,overhead,jpeg] [--json out.json] [--quick]

Four comparisons, each against a baseline run in the same call (--parts picks them):

1. ResNet-18 (torchvision, 10 classes) on 45,000 synthetic 32x32x3 uint8 samples, bf16,
   global batch = micro-batch = 512, one process: ddp.train's steady samples/s (epochs
   1.., from its metrics.jsonl) against the *bound*: the same model, batch, precision
   and fused AdamW in a bare loop in this process, with the uint8 data already on the
   GPU (converted there, as ddp does), no host sync but at the end. Variants of ours:
   the split held on the GPU (data.loader.on_device, the default for a split that fits),
   the shard path with 8 DataLoader workers (pinned memory, side-stream prefetch),
   channels-last, the step read at once (trainer.sync_every_step=true: what reading the
   step's totals one step late buys), and (--compile) torch.compile.
2. The CNN and the MLP of bench/overhead.py: ours vs a raw DDP loop vs Lightning, in
   overhead.py's CUDA mode (one process per GPU, nccl): steps/s ratios.
3. The shard path with workers against the in-memory split (from 1.).
4. `jpeg` (issue 13): ResNet-50 (torchvision, 8 classes) at 224x224, bf16, channels-last,
   micro-batch = global batch = 256, one process, 3 epochs (the last 2 timed), trained
   from JPEG shards (`ddp-shards prepare photos`: about 400x350, quality 90; 20,480
   training samples)
   with data.augment (random-resized crop + flip) decoded in DataLoader workers
   (placement=host, cores - 2 workers) and by nvJPEG on the GPU (placement=device, 4
   workers packing bytes), against the bound: the same model, batch, precision,
   memory order, normalisation and fused AdamW with random uint8 images already on
   the GPU.

GPU utilisation (nvidia-smi, sampled every 100 ms) is reported for our runs' steady
epochs. Goals (issue 12; the jpeg part, issue 13): bench/goals.py's GPU, and OVERHEAD for
part 2; a missed goal exits 1. Results: bench/results/gpu[-PARTS]-DATE.json. On a
machine without a GPU, --quick runs the same code paths on the CPU with a small CNN (a
smoke test, no figures worth reporting).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from goals import GPU, MISSED, OVERHEAD, Goal, exit_code, judge
from results import write

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    name: str
    samples_per_s: float
    gpu_util: float | None = None
    """Mean GPU utilisation (%) while it trained."""
    epochs: list[float] = field(default_factory=list)
    data_share: float | None = None
    """ddp.train's time/data over the steady epochs (median): the GPU waiting for data."""
    mfu: float | None = None
    """ddp.train's perf/mfu over the steady epochs (median), where the device is known."""


# ----------------------------------------------------------------------------- data


def ensure_data(work: Path, num_samples: int, shape: str) -> Path:
    out = work / f"synthetic-{num_samples}-{shape.replace(',', 'x')}"
    if not (out / "val" / "manifest.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "ddp.shards.cli",
                "prepare",
                "synthetic",
                f"--num-samples={num_samples}",
                f"--shape={shape}",
                "--num-classes=10",
                "--shard-size=5000",
                "--val-fraction=0.1",
                f"--out={out}",
            ],
            cwd=ROOT,
            check=True,
        )
    return out


def ensure_photos(work: Path, num_samples: int, size: str, val_samples: int) -> Path:
    """`ddp-shards prepare photos` (all cores encode), `val_samples` of them for validation."""
    out = work / f"photos-{num_samples}-{size.replace(',', 'x')}"
    if not (out / "val" / "manifest.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "ddp.shards.cli", "prepare", "photos",
               f"--num-samples={num_samples}", f"--size={size}", "--shard-size=1000",
               f"--val-fraction={val_samples / num_samples}", f"--out={out}",
               f"--workers={os.cpu_count() or 1}"]  # fmt: skip
        subprocess.run(cmd, cwd=ROOT, check=True)
    return out


# ----------------------------------------------------------------------------- bound


def bound_samples_per_s(
    model_fn,
    batch: int,
    steps: int,
    warmup: int,
    device,
    dtype,
    shape: tuple[int, int, int] = (32, 32, 3),
    num_classes: int = 10,
    channels_last: bool = False,
    normalize: dict | None = None,
) -> float:
    """The model trained on data already on the device: what the GPU alone allows. The
    uint8 images become inputs as ours do (ddp.data.device.InputPipeline)."""
    import torch
    import torch.nn.functional as F

    from ddp.data.batch import Batch
    from ddp.data.device import InputPipeline

    torch.manual_seed(0)
    model = model_fn().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    images = torch.randint(0, 256, (8, batch, *shape), dtype=torch.uint8, device=device)
    labels = torch.randint(0, num_classes, (8, batch), device=device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else _null()
    norm = normalize or {}
    pipeline = InputPipeline(device, channels_last, norm.get("mean"), norm.get("std"))
    valid = torch.ones(batch, dtype=torch.bool, device=device)

    def step(i: int) -> None:
        x = pipeline(Batch(images[i % 8], labels[i % 8], valid, torch.arange(batch))).inputs
        with autocast:
            loss = F.cross_entropy(model(x).float(), labels[i % 8])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(i)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def _null():
    import contextlib

    return contextlib.nullcontext()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- ours


class GpuSampler:
    """nvidia-smi's utilisation.gpu every 100 ms, in a thread, while a run trains."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        if shutil.which("nvidia-smi") is None:
            return
        cmd = [
            "nvidia-smi",
            "--query-gpu=utilization.gpu",
            "--format=csv,noheader,nounits",
            "-lms",
            "100",
        ]
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
            for line in proc.stdout:
                if self._stop.is_set():
                    proc.terminate()
                    break
                try:
                    self.samples.append((time.time(), float(line.split(",")[0])))
                except ValueError:
                    pass

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def mean_between(self, start: float, end: float) -> float | None:
        values = [u for t, u in self.samples if start <= t <= end]
        return statistics.fmean(values) if values else None


def run_ours(name: str, overrides: list[str], work: Path, nproc: int = 1) -> Result:
    """ddp.train; steady samples/s = median of its per-epoch train samples/s, epoch 0
    (warm-up, cuDNN autotuning, compilation) left out."""
    run_dir = work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "ddp.train",
        *overrides,
        f"run.root={run_dir.parent}",
        f"run.name={name}",
        "logger=none",
        "trainer.progress=false",
        "plateau=none",
    ]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "ddp.launch",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "ddp.train",
            *cmd[3:],
        ]
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    with GpuSampler() as gpu, open(log, "w") as out:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    if code.returncode != 0:
        raise RuntimeError(f"{name} failed ({code.returncode}); see {log}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if r["kind"] == "val"]
    per_epoch = [r["train/samples_per_s"] for r in vals]
    steady = per_epoch[1:] or per_epoch
    # GPU utilisation over the steady epochs' training (from the end of epoch 0's
    # validation to the last validation's start, roughly: validation is short here).
    util = gpu.mean_between(vals[0]["time"], vals[-1]["time"]) if len(vals) > 1 else None
    steady_vals = vals[1:] or vals
    data_share = statistics.median(r["time/data"] for r in steady_vals)
    mfus = [r["perf/mfu"] for r in steady_vals if "perf/mfu" in r]
    mfu = statistics.median(mfus) if mfus else None
    return Result(name, statistics.median(steady), util, per_epoch, data_share, mfu)


# ----------------------------------------------------------------------------- overhead


def run_overhead(work: Path, quick: bool) -> Ratios:
    """bench/overhead.py in its CUDA mode: ours vs raw DDP vs Lightning, CNN and MLP."""
    out = work / "overhead.json"
    out.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "overhead.py"),
        "--json",
        str(out),
        "--no-scaling",
        "--programs",
        "ours,raw,lightning",
        "--work",
        str(work / "overhead"),
    ]
    cmd += (
        ["--quick"]
        if quick
        else ["--repeats", "2", "--cnn-samples", "50000", "--cnn-channels", "32,64"]
    )
    log = work / "logs" / "overhead.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if code not in (0, MISSED) or not out.exists():  # a missed goal is judged again here
        raise RuntimeError(f"bench/overhead.py failed ({code}); see {log}")
    summary = json.loads(out.read_text())["summary"]
    ratios = {}
    for case, rows in summary.items():
        steady = rows["steady steps/s (whole epochs)"]
        for other in ("raw", "lightning"):
            if steady.get(f"ours/{other}") is not None:
                goal = OVERHEAD[f"steps/s ours/{other}"]
                ratios[f"{case} ours / {other}"] = (steady[f"ours/{other}"], goal)
    return ratios


# ----------------------------------------------------------------------------- main


Ratios = dict[str, tuple[float, Goal | None]]
"""name -> (value, goal or None)."""


def torchvision_model(name: str, num_classes: int):
    """(model_fn, overrides, name) for a torchvision model, or a SmallCNN where the CPU
    machine's torch has no matching torchvision (the --quick smoke run)."""
    try:
        import torchvision

        def model_fn():
            return getattr(torchvision.models, name)(num_classes=num_classes)

        overrides = [
            "model=custom",
            f"model._target_=torchvision.models.{name}",
            f"+model.num_classes={num_classes}",
        ]
        return model_fn, overrides, name
    except ImportError:
        from ddp.models import SmallCNN

        def model_fn():
            return SmallCNN(3, num_classes, (16, 32))

        overrides = ["model=cnn", "model.in_channels=3", "model.channels=[16,32]",
                     f"model.num_classes={num_classes}"]  # fmt: skip
        return model_fn, overrides, "smallcnn"


def report(result: Result) -> None:
    print(
        f"  {result.name}: {result.samples_per_s:,.0f} samples/s "
        f"(epochs {[round(e) for e in result.epochs]}, gpu {result.gpu_util})",
        flush=True,
    )


def resnet18_part(args, device, work: Path) -> tuple[list[Result], Ratios]:
    """1. and 3.: ResNet-18 on 32x32 npy shards, ours against the bound."""
    import torch

    cuda = device.type == "cuda"
    samples, batch, epochs = (2_000, 64, 2) if args.quick else (50_000, 512, args.epochs)
    data = ensure_data(work, samples, "32,32,3")
    model_fn, model, model_name = torchvision_model("resnet18", 10)
    common = [
        *model,
        f"data.root={data}",
        f"batch.global_size={batch}",
        f"batch.micro_size={batch}",
        f"trainer.max_epochs={epochs}",
        f"trainer.precision={'bf16' if cuda else 'fp32'}",
        "data.input_key=npy",
    ]
    dtype = torch.bfloat16 if cuda else None
    bound = bound_samples_per_s(
        model_fn, batch, 20 if args.quick else 200, 5 if args.quick else 30, device, dtype
    )
    results = [Result(f"{model_name} bound (data on the GPU)", bound)]
    print(f"  bound {bound:,.0f} samples/s", flush=True)
    variants = {
        "ours (split on the GPU)": [],
        "ours (shards, 8 workers)": ["data.loader.in_memory_max_mb=0", "data.loader.num_workers=8"],
        "ours (channels-last)": ["trainer.channels_last=true"],
        "ours (synchronous step)": ["trainer.sync_every_step=true"],
    }
    if args.quick:
        variants["ours (shards, 8 workers)"] = [
            "data.loader.in_memory_max_mb=0",
            "data.loader.num_workers=2",
        ]
    if args.compile:
        variants["ours (torch.compile)"] = ["trainer.compile.enabled=true"]
    for label, extra in variants.items():
        name = label.split("(")[1].rstrip(")").replace(" ", "-").replace(",", "")
        result = run_ours(f"{model_name}-{name}", [*common, *extra], work)
        result.name = f"{model_name} {label}"
        results.append(result)
        report(result)
    memory = results[1].samples_per_s
    ratios: Ratios = {
        f"{model_name} ours / bound": (memory / bound, GPU["resnet18 ours / bound"]),
        f"{model_name} shards+workers / in-memory": (
            results[2].samples_per_s / memory,
            GPU["resnet18 shards+workers / in-memory"],
        ),
        f"{model_name} channels-last / NCHW": (results[3].samples_per_s / memory, None),
        f"{model_name} late-read step / synchronous": (memory / results[4].samples_per_s, None),
    }
    if args.compile:
        ratios[f"{model_name} compiled / eager"] = (results[5].samples_per_s / memory, None)
    return results, ratios


def jpeg_part(args, device, work: Path) -> tuple[list[Result], Ratios]:
    """4.: ResNet-50 at 224 from JPEG shards, both placements, against the bound."""
    import torch

    cuda = device.type == "cuda"
    if args.quick:  # a smoke run of the same code paths, also on a CPU
        samples, photo, size, batch, epochs, val = 640, "64,56", 32, 32, 2, 64
    else:
        samples, photo, size, batch, epochs, val = 20_800, "400,350", 224, 256, 3, 320
    data = ensure_photos(work, samples, photo, val)
    model_fn, model, model_name = torchvision_model("resnet50", 8)
    norm = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # conf/data/photos
    dtype = torch.bfloat16 if cuda else None
    steps, warmup = (10, 3) if args.quick else (80, 20)
    bound = bound_samples_per_s(
        model_fn, batch, steps, warmup, device, dtype, (size, size, 3), 8, True, norm
    )
    results = [Result(f"{model_name} {size}px bound (data on the GPU)", bound)]
    print(f"  bound {bound:,.0f} samples/s", flush=True)
    common = [  # experiment=photos_resnet50, spelled out (the smoke run swaps the model)
        "data=photos",
        *model,
        "trainer.channels_last=true",
        f"data.root={data}",
        f"data.augment.size={size}",
        f"batch.global_size={batch}",
        f"batch.micro_size={batch}",
        f"trainer.max_epochs={epochs}",
        f"trainer.precision={'bf16' if cuda else 'fp32'}",
    ]
    host_workers = 2 if args.quick else max(1, (os.cpu_count() or 2) - 2)
    device_workers = 2 if args.quick else 4
    variants = {
        f"host ({host_workers} workers decode)": [
            "data.augment.placement=host",
            f"data.loader.num_workers={host_workers}",
        ],
        f"device (nvJPEG; {device_workers} workers pack bytes)": [
            "data.augment.placement=device",
            f"data.loader.num_workers={device_workers}",
        ],
    }
    ratios: Ratios = {}
    for label, extra in variants.items():
        placement = label.split()[0]
        result = run_ours(f"{model_name}-jpeg-{placement}", [*common, *extra], work)
        result.name = f"{model_name} jpeg, placement={label}"
        results.append(result)
        report(result)
        ratios[f"{model_name} jpeg, {placement} / bound"] = (result.samples_per_s / bound, None)
    best = max(value for value, _ in ratios.values())
    ratios[f"{model_name} jpeg, best placement / bound"] = (
        best,
        GPU["resnet50 jpeg, best placement / bound"],
    )
    return results, ratios


PARTS = ("resnet18", "overhead", "jpeg")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path)
    p.add_argument("--work", type=Path, default=Path("/tmp/ddp-gpu-bench"))
    p.add_argument("--quick", action="store_true", help="a smoke run (also on a CPU)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--parts", default=",".join(PARTS), help=f"some of {','.join(PARTS)}")
    p.add_argument("--compile", action="store_true", help="also time trainer.compile.enabled=true")
    p.add_argument("--no-overhead", action="store_true", help="skip part 2 (overhead.py)")
    args = p.parse_args(argv)
    parts = [part for part in args.parts.split(",") if part]
    if unknown := set(parts) - set(PARTS):
        p.error(f"--parts: unknown {', '.join(sorted(unknown))} (choose from {', '.join(PARTS)})")

    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    t_start = time.time()
    print(f"device: {torch.cuda.get_device_name(0) if cuda else 'cpu'}", flush=True)
    results: list[Result] = []
    ratios: Ratios = {}
    if "resnet18" in parts:
        part_results, part_ratios = resnet18_part(args, device, args.work)
        results += part_results
        ratios.update(part_ratios)
    if "overhead" in parts and not args.no_overhead:
        ratios.update(run_overhead(args.work, args.quick))
    if "jpeg" in parts:
        part_results, part_ratios = jpeg_part(args, device, args.work)
        results += part_results
        ratios.update(part_ratios)

    print(f"\n{'run':<60} {'samples/s':>12} {'GPU util %':>11} {'data %':>7} {'MFU %':>6}")
    for r in results:
        util = "-" if r.gpu_util is None else f"{r.gpu_util:.0f}"
        data = "-" if r.data_share is None else f"{100 * r.data_share:.0f}"
        mfu = "-" if r.mfu is None else f"{100 * r.mfu:.1f}"
        print(f"{r.name:<60} {r.samples_per_s:>12,.0f} {util:>11} {data:>7} {mfu:>6}")
    print(f"\n{'ratio':<60} {'value':>8} {'goal':>8}")
    for key, (value, goal) in ratios.items():
        verdict = "" if goal is None else ("PASS" if goal.met(value) else "FAIL")
        print(f"{key:<60} {value:>8.3f} {'' if goal is None else str(goal):>8} {verdict}")
    print(f"\n{time.time() - t_start:.0f} s in all")
    goals = [judge(key, goal, value) for key, (value, goal) in ratios.items() if goal]
    numbers = {
        "machine": {"device": torch.cuda.get_device_name(0) if cuda else "cpu"},
        "options": {k: str(v) for k, v in vars(args).items()},
        "results": [asdict(r) for r in results],
        "ratios": {k: v for k, (v, _) in ratios.items()},
        "goals": goals,
    }
    name = "gpu" + ("" if set(parts) == set(PARTS) else "-" + "-".join(parts))
    write(name + ("-quick" if args.quick else ""), numbers, args.json)
    return exit_code(goals)


if __name__ == "__main__":
    sys.exit(main())
