"""ddp on a GPU, against what the GPU can do: one command, one table, under 5 minutes.

    python bench/gpu.py [--json out.json] [--quick]

Three comparisons, each against a baseline run in the same call:

1. ResNet-18 (torchvision, 10 classes) on 45,000 synthetic 32x32x3 uint8 samples, bf16,
   global batch = micro-batch = 512, one process: ddp.train's steady samples/s (epochs
   1.., from its metrics.jsonl) against the *bound*: the same model, batch, precision
   and fused AdamW in a bare loop in this process, with the uint8 data already on the
   GPU (converted there, as ddp does), no host sync but at the end. Variants of ours:
   the split held on the GPU (data.on_device, the default for a split that fits),
   the shard path with 8 DataLoader workers (pinned memory, side-stream prefetch),
   channels-last, the step read at once (trainer.sync_every_step=true: what reading the
   step's totals one step late buys), and (--compile) torch.compile.
2. The CNN and the MLP of bench/overhead.py: ours vs a raw DDP loop vs Lightning, in
   overhead.py's CUDA mode (one process per GPU, nccl): steps/s ratios.
3. The shard path with workers against the in-memory split (from 1.).

GPU utilisation (nvidia-smi, sampled every 100 ms) is reported for our runs' whole
training phase. Goals (issue 12): ResNet-18 >= 0.95x the bound; CNN and MLP >= 0.97x
raw DDP and >= 1.5x Lightning; shard path with workers >= 0.95x the in-memory split.
On a machine without a GPU, --quick runs the same code paths on the CPU with a small
CNN (a smoke test, no figures worth reporting).
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

ROOT = Path(__file__).resolve().parents[1]

GOALS = {
    "resnet18 ours / bound": 0.95,
    "resnet18 shards+workers / in-memory": 0.95,
    "cnn ours / raw": 0.97,
    "cnn ours / lightning": 1.5,
    "mlp ours / raw": 0.97,
    "mlp ours / lightning": 1.5,
}


@dataclass
class Result:
    name: str
    samples_per_s: float
    gpu_util: float | None = None
    """Mean GPU utilisation (%) while it trained."""
    epochs: list[float] = field(default_factory=list)


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


# ----------------------------------------------------------------------------- bound


def bound_samples_per_s(model_fn, batch: int, steps: int, warmup: int, device, dtype) -> float:
    """The model trained on data already on the device: what the GPU alone allows."""
    import torch
    import torch.nn.functional as F

    from ddp.data.batch import to_model_input

    torch.manual_seed(0)
    model = model_fn().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    images = torch.randint(0, 256, (8, batch, 32, 32, 3), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (8, batch), device=device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else _null()

    def step(i: int) -> None:
        x = to_model_input(images[i % 8])
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
    return Result(name, statistics.median(steady), util, per_epoch)


# ----------------------------------------------------------------------------- overhead


def run_overhead(work: Path, quick: bool) -> dict:
    """bench/overhead.py in its CUDA mode: ours vs raw DDP vs Lightning, CNN and MLP."""
    out = work / "overhead.json"
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
    if code != 0:
        raise RuntimeError(f"bench/overhead.py failed ({code}); see {log}")
    summary = json.loads(out.read_text())["summary"]
    ratios = {}
    for case, rows in summary.items():
        steady = rows["steady steps/s (whole epochs)"]
        for other in ("raw", "lightning"):
            if steady.get(f"ours/{other}") is not None:
                ratios[f"{case} ours / {other}"] = steady[f"ours/{other}"]
    return ratios


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path)
    p.add_argument("--work", type=Path, default=Path("/tmp/ddp-gpu-bench"))
    p.add_argument("--quick", action="store_true", help="a smoke run (also on a CPU)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--compile", action="store_true", help="also time trainer.compile=true")
    p.add_argument("--no-overhead", action="store_true", help="skip part 2 (overhead.py)")
    args = p.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    work = args.work
    t_start = time.time()
    samples, batch, epochs = (2_000, 64, 2) if args.quick else (50_000, 512, args.epochs)
    data = ensure_data(work, samples, "32,32,3")
    try:
        import torchvision

        def model_fn():
            return torchvision.models.resnet18(num_classes=10)

        model = [
            "model=custom",
            "model._target_=torchvision.models.resnet18",
            "+model.num_classes=10",
        ]
        model_name = "resnet18"
    except ImportError:  # the CPU machine's torch has no matching torchvision
        from ddp.models import SmallCNN

        def model_fn():
            return SmallCNN(3, 10, (16, 32))

        model = ["model=cnn", "model.in_channels=3", "model.channels=[16,32]"]
        model_name = "smallcnn"
    precision = "bf16" if cuda else "fp32"
    common = [
        *model,
        f"data.root={data}",
        f"batch.global_size={batch}",
        f"batch.micro_size={batch}",
        f"trainer.max_epochs={epochs}",
        f"trainer.precision={precision}",
        "data.input_key=npy",
    ]

    results: list[Result] = []
    print(f"device: {torch.cuda.get_device_name(0) if cuda else 'cpu'}", flush=True)
    dtype = torch.bfloat16 if cuda else None
    bound = bound_samples_per_s(
        model_fn, batch, 20 if args.quick else 200, 5 if args.quick else 30, device, dtype
    )
    results.append(Result(f"{model_name} bound (data on the GPU)", bound))
    print(f"  bound {bound:,.0f} samples/s", flush=True)
    variants = {
        "ours (split on the GPU)": [],
        "ours (shards, 8 workers)": ["data.in_memory_max_mb=0", "data.num_workers=8"],
        "ours (channels-last)": ["trainer.channels_last=true"],
        "ours (synchronous step)": ["trainer.sync_every_step=true"],
    }
    if args.quick:
        variants["ours (shards, 8 workers)"] = ["data.in_memory_max_mb=0", "data.num_workers=2"]
    if args.compile:
        variants["ours (torch.compile)"] = ["trainer.compile=true"]
    for label, extra in variants.items():
        name = label.split("(")[1].rstrip(")").replace(" ", "-").replace(",", "")
        result = run_ours(f"{model_name}-{name}", [*common, *extra], work)
        result.name = f"{model_name} {label}"
        results.append(result)
        print(
            f"  {result.name}: {result.samples_per_s:,.0f} samples/s "
            f"(epochs {[round(e) for e in result.epochs]}, gpu {result.gpu_util})",
            flush=True,
        )

    ratios = {
        f"{model_name} ours / bound": results[1].samples_per_s / bound,
        f"{model_name} shards+workers / in-memory": results[2].samples_per_s
        / results[1].samples_per_s,
        f"{model_name} channels-last / NCHW": results[3].samples_per_s / results[1].samples_per_s,
        f"{model_name} late-read step / synchronous": results[1].samples_per_s
        / results[4].samples_per_s,
    }
    if args.compile:
        ratios[f"{model_name} compiled / eager"] = (
            results[5].samples_per_s / results[1].samples_per_s
        )
    if not args.no_overhead:
        ratios.update(run_overhead(work, args.quick))

    print(f"\n{'run':<48} {'samples/s':>12} {'GPU util %':>11}")
    for r in results:
        util = "-" if r.gpu_util is None else f"{r.gpu_util:.0f}"
        print(f"{r.name:<48} {r.samples_per_s:>12,.0f} {util:>11}")
    print(f"\n{'ratio':<48} {'value':>8} {'goal':>8}")
    for key, value in ratios.items():
        goal = GOALS.get(key.replace(model_name, "resnet18"))
        verdict = "" if goal is None else ("PASS" if value >= goal else "FAIL")
        print(f"{key:<48} {value:>8.3f} {'' if goal is None else f'>= {goal}':>8} {verdict}")
    print(f"\n{time.time() - t_start:.0f} s in all")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                    "torch": torch.__version__,
                    "results": [asdict(r) for r in results],
                    "ratios": ratios,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
