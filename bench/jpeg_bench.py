"""Decoded + augmented JPEG samples/s per process: ours vs webdataset + PIL + torchvision.

    python bench/jpeg_bench.py [--num-samples 3000] [--size 224] [--repeats 3]

The same shards for every row: `ddp-shards prepare photos` (natural-image JPEGs of
about 400x350, quality 90), one process, one torch thread, micro-batch 256, output
uint8 size x size x 3 (the device normalises afterwards, in both pipelines alike):

- ours, train: `TrainLoader` with data.augment (placement=host), random-resized crop
  (scale 0.08-1, ratio 3/4-4/3) + flip, exact epoch order, num_workers=0;
- webdataset, train: shard shuffle + 1,000-sample buffer shuffle, `.decode("pil")`,
  torchvision's RandomResizedCrop(size) + RandomHorizontalFlip + PILToTensor, batched;
- the same two for evaluation: our center crop of 0.875 of the shorter side, and
  torchvision's Resize(size / 0.875) + CenterCrop(size);
- ours, placement=device, worker side: what a DataLoader worker does per sample when
  the GPU decodes (read, check the header, draw the crop, pack the bytes);
- ours, placement=device, on this CPU: the device path run here (Pillow decode in the
  training process, torch float crop/resize): the code the GPU runs, not its speed.

Rows are run in turn, `--repeats` times; each row reports its best run (on a shared
machine the slow runs measure the neighbours), the ratios are best against best. Goal:
bench/goals.py's JPEG, on the wall-clock ratios (a missed goal exits 1); results in
bench/results/jpeg[-pillow]-DATE.json (or --json).

torchvision: the GPU machine has one that matches its torch. On the CPU development
machine (torch 2.13+cpu) `import torchvision` fails ("operator torchvision::nms does not
exist", from torchvision._meta_registrations), so install it beside, without its
dependencies, and this script imports it with that module stubbed out; only its
transforms on PIL images are used, and they work:

    pip install --no-deps --target /tmp/ddp-torchvision torchvision==0.28.0
    python bench/jpeg_bench.py --torchvision /tmp/ddp-torchvision
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from goals import JPEG, exit_code, judge, print_rows
from results import write

from ddp.data import images as images_module
from ddp.data.batch import LoaderOptions
from ddp.data.device_jpeg import decode_jpegs
from ddp.data.images import ImageAugment
from ddp.data.loaders import build_eval_loader, build_train_loader
from ddp.plan import make_plan
from ddp.shards import read_manifest
from ddp.shards.prepare import prepare_photos

MICRO = 256


def import_torchvision(path: Path | None) -> types.ModuleType:
    try:
        import torchvision

        return torchvision
    except Exception:  # noqa: BLE001 - a torchvision that does not match this torch
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
    if path is None:
        raise SystemExit("torchvision does not import here: give --torchvision DIR (see above)")
    sys.path.insert(0, str(path))
    sys.modules["torchvision._meta_registrations"] = types.ModuleType(
        "torchvision._meta_registrations"
    )
    import torchvision

    return torchvision


def prepare(root: Path, count: int, workers: int) -> Path:
    out = root / f"photos-{count}"
    if not (out / "train" / "manifest.json").exists():
        prepare_photos(out, count, seed=0, shard_size=500, val_fraction=0.0, workers=workers)
    return out / "train"


def shard_paths(split: Path) -> list[str]:
    return [str(split / s.name) for s in read_manifest(split).shards]


Rate = tuple[float, float]
"""(samples per wall-clock second, samples per CPU second of this process)."""


def rate(batches, limit: int) -> Rate:
    """Samples/s over the first `limit` samples of `batches` (each a sized batch)."""
    wall, cpu, seen = time.perf_counter(), time.process_time(), 0
    for batch in batches:
        seen += len(batch)
        if seen >= limit:
            break
    return seen / (time.perf_counter() - wall), seen / (time.process_time() - cpu)


def ours(split: Path, size: int, train: bool, placement: str, limit: int) -> Rate:
    n = read_manifest(split).num_samples
    options = LoaderOptions(input_key="jpg")
    images = ImageAugment(size=size, train=train, seed=0, placement=placement)  # type: ignore[arg-type]
    if train:
        plan = make_plan(n, MICRO, MICRO, 1)
        batches = build_train_loader(split, plan, 0, 0, options, images=images).epoch(1)
    else:
        batches = iter(build_eval_loader(split, MICRO, 0, 1, options, images=images))
    return rate(batches, limit)


def ours_device_on_cpu(split: Path, size: int, limit: int) -> Rate:
    cpu = torch.device("cpu")
    n = read_manifest(split).num_samples
    images = ImageAugment(size=size, train=True, seed=0, placement="device")
    loader = build_train_loader(
        split, make_plan(n, MICRO, MICRO, 1), 0, 0, LoaderOptions(input_key="jpg"), images=images
    )
    return rate((decode_jpegs(b, cpu) for b in loader.epoch(1)), limit)


def webdataset(split: Path, transform: Callable, limit: int) -> Rate:
    import webdataset as wds

    pipeline = (
        wds.WebDataset(shard_paths(split), shardshuffle=100, seed=0, empty_check=False)
        .shuffle(1000)
        .decode("pil")
        .to_tuple("jpg", "cls")
        .map_tuple(transform, int)
        .batched(MICRO)  # webdataset's default collation: torch.stack, like a DataLoader's
    )
    return rate((images for images, _ in pipeline), limit)


def torchvision_transforms(tv: types.ModuleType, size: int) -> dict[str, Callable]:
    T = tv.transforms
    return {
        "train": T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.PILToTensor()]),
        "eval": T.Compose(
            [T.Resize(int(round(size / 0.875))), T.CenterCrop(size), T.PILToTensor()]
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=3000)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", type=Path, default=Path("/tmp/ddp-jpeg-bench"))
    p.add_argument("--torchvision", type=Path, help="a directory holding torchvision")
    p.add_argument("--prepare-workers", type=int, default=2)
    p.add_argument("--pillow-only", action="store_true", help="ours without simplejpeg")
    p.add_argument("--json", type=Path, help="the results file (default: bench/results/)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.pillow_only:
        images_module._simplejpeg = lambda: None  # every JPEG through Pillow
    tv = import_torchvision(args.torchvision)
    split = prepare(args.data, args.num_samples, args.prepare_workers)
    limit = read_manifest(split).num_samples
    transforms = torchvision_transforms(tv, args.size)
    rows: dict[str, Callable[[], Rate]] = {
        "ours, train (host)": lambda: ours(split, args.size, True, "host", limit),
        "webdataset + PIL + torchvision, train": lambda: webdataset(
            split, transforms["train"], limit
        ),
        "ours, eval (host)": lambda: ours(split, args.size, False, "host", limit),
        "webdataset + PIL + torchvision, eval": lambda: webdataset(
            split, transforms["eval"], limit
        ),
        "ours, device placement: worker side": lambda: ours(
            split, args.size, True, "device", limit
        ),
        "ours, device placement run on this CPU": lambda: ours_device_on_cpu(
            split, args.size, min(limit, 1024)
        ),
    }
    ours(split, args.size, True, "host", MICRO)  # warm the page cache and the code paths
    runs: dict[str, list[Rate]] = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, row in rows.items():
            runs[name].append(row())
    best = {name: tuple(max(r[k] for r in values) for k in (0, 1)) for name, values in runs.items()}
    pairs = {"train": ("ours, train (host)", "webdataset + PIL + torchvision, train"),
             "eval": ("ours, eval (host)", "webdataset + PIL + torchvision, eval")}  # fmt: skip
    ratios = {
        f"{case}: ours / webdataset ({clock})": best[a][k] / best[b][k]
        for case, (a, b) in pairs.items()
        for k, clock in enumerate(("wall", "CPU"))
    }
    print(f"{'row':<42} {'samples/s':>10} {'per CPU s':>10}   wall-clock runs")
    for name, (wall, cpu) in best.items():
        print(f"{name:<42} {wall:>10,.0f} {cpu:>10,.0f}   {[round(r[0]) for r in runs[name]]}")
    print()
    for name, value in ratios.items():
        print(f"{name:<42} {value:>9.2f}x")
    goals = [judge(name, JPEG, value) for name, value in ratios.items() if "wall" in name]
    print_rows(goals)
    decoder = "simplejpeg" if images_module._simplejpeg() else "Pillow"
    print(
        f"\n{limit:,} photos of about 400x350 (JPEG q90) -> {args.size}x{args.size} uint8, "
        f"micro-batch {MICRO}, one process, one thread, best of {args.repeats}; torch "
        f"{torch.__version__}, torchvision {tv.__version__}, JPEGs decoded by "
        f"{decoder}"
    )
    numbers = {
        "options": {k: v for k, v in vars(args).items() if k != "json"},
        "photos": limit,
        "torchvision": tv.__version__,
        "decoder": decoder,
        "runs (samples/s, per CPU-second)": runs,
        "best": best,
        "ratios": ratios,
        "goals": goals,
    }
    write("jpeg-pillow" if args.pillow_only else "jpeg", numbers, args.json)
    return exit_code(goals)


if __name__ == "__main__":
    sys.exit(main())
