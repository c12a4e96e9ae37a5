"""`ddp-shards`: prepare, index, verify shards, print the order a rank reads, and write
a synthetic index (no shards) to measure what grows with the number of samples.

Exit codes: 0 fine, 1 `verify` found problems, 2 bad input (missing or corrupt
data, bad arguments), each with one line naming the culprit.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ddp.errors import BadInput, ConfigError, DataError
from ddp.order import ShardWindows, rank_micro_batches
from ddp.plan import make_plan
from ddp.shards.index import index_split, manifest_version, upgrade_split
from ddp.shards.manifest import VERSION, Manifest, manifest_path, read_manifest
from ddp.shards.prepare import (
    prepare_digits,
    prepare_imagefolder,
    prepare_photos,
    prepare_synthetic,
)
from ddp.shards.synthetic import write_synthetic_index
from ddp.shards.verify import verify_split

BAD_INPUT = 2


def _shape(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.split(",")]
    if len(parts) == 2:
        parts.append(1)
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: expected H,W,C with positive ints")
    return parts[0], parts[1], parts[2]


def _size(text: str) -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) >= 8 for p in parts):
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected W,H with ints >= 8")
    return int(parts[0]), int(parts[1])


def _steps(text: str) -> tuple[int | None, int | None]:
    lo, sep, hi = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"--steps {text!r}: expected a:b (either may be empty)")
    return (int(lo) if lo else None), (int(hi) if hi else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddp-shards", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare", help="write train/val shards from a source")
    sources = prepare.add_subparsers(dest="source", required=True)
    digits = sources.add_parser("digits", help="scikit-learn's bundled 8x8 digits")
    digits.add_argument("--out", type=Path, default=Path("data/digits"))
    digits.add_argument("--shard-size", type=int, default=256)
    digits.add_argument("--seed", type=int, default=0)
    digits.add_argument("--val-fraction", type=float, default=0.2)

    synth = sources.add_parser("synthetic", help="seeded, learnable class patterns")
    synth.add_argument("--num-samples", type=int, required=True)
    synth.add_argument("--shape", type=_shape, required=True, help="H,W,C")
    synth.add_argument("--num-classes", type=int, default=10)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--format", choices=("npy", "png", "jpg"), default="npy")
    synth.add_argument("--shard-size", type=int, default=1000)
    synth.add_argument("--val-fraction", type=float, default=0.1)
    synth.add_argument("--out", type=Path, required=True)

    photos = sources.add_parser(
        "photos", help="natural-image JPEGs cut from scikit-learn's two sample photos"
    )
    photos.add_argument("--num-samples", type=int, default=10_000)
    photos.add_argument("--size", type=_size, default=(400, 350), help="W,H (about; +-20%%)")
    photos.add_argument("--quality", type=int, default=90)
    photos.add_argument("--seed", type=int, default=0)
    photos.add_argument("--shard-size", type=int, default=1000)
    photos.add_argument("--val-fraction", type=float, default=0.1)
    photos.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    photos.add_argument("--out", type=Path, default=Path("data/photos"))

    folder = sources.add_parser("imagefolder", help="SRC/CLASS/*.jpg|png")
    folder.add_argument("src", type=Path)
    folder.add_argument("--out", type=Path, required=True)
    folder.add_argument("--shard-size", type=int, default=1000)
    folder.add_argument("--seed", type=int, default=0)
    folder.add_argument("--val-fraction", type=float, default=0.1)

    index = commands.add_parser("index", help="write manifest.json for existing *.tar shards")
    index.add_argument("dir", type=Path)
    index.add_argument(
        "--decompress",
        action="store_true",
        help="first write x.tar beside each x.tar.gz / .tgz / .tar.bz2 / .tar.xz",
    )
    index.add_argument(
        "--upgrade",
        action="store_true",
        help="rewrite an older manifest as v2 from the manifest itself, without reading shards",
    )

    verify = commands.add_parser("verify", help="checksums, counts, decodability, shapes")
    verify.add_argument("dir", type=Path)
    verify.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        help="judge the split as read without data.augment: images too are stacked as "
        "stored, so mixed sizes are problems (default: data.augment crops them to one size)",
    )

    order = commands.add_parser("order", help="keys rank R consumes in epoch E, in order")
    order.add_argument("dir", type=Path)
    order.add_argument("--epoch", type=int, required=True)
    order.add_argument("--rank", type=int, required=True)
    order.add_argument("--world-size", type=int, required=True)
    order.add_argument("--micro-size", type=int, required=True)
    order.add_argument("--accumulate", type=int, required=True)
    order.add_argument("--seed", type=int, default=0)
    order.add_argument("--steps", type=_steps, default=(None, None), help="a:b, steps [a, b)")
    order.add_argument("--drop-last", action="store_true")
    order.add_argument(
        "--window-shards",
        type=int,
        metavar="K",
        help="the shard-window order of data.window_shards=K (default: all samples shuffled)",
    )
    order.add_argument(
        "--member",
        metavar="EXT",
        help="also print this text member of each sample (e.g. source: the file it came from)",
    )

    synth = commands.add_parser(
        "synth-index", help="a synthetic v2 index of any size, no tar files (for benchmarks)"
    )
    synth.add_argument("dir", type=Path)
    synth.add_argument("--shards", type=int, required=True)
    synth.add_argument("--samples-per-shard", type=int, required=True)
    synth.add_argument("--extensions", default="cls,npy", help="comma-separated member columns")
    synth.add_argument("--sample-bytes", type=int, default=4096, help="sets the shard sizes")
    return parser


def _summary(name: str, manifest: Manifest) -> str:
    return f"{name}: {manifest.num_samples:,} samples in {len(manifest.shards)} shards"


def cmd_prepare(args: argparse.Namespace) -> int:
    if args.shard_size < 1:
        raise ConfigError(f"--shard-size={args.shard_size} must be >= 1")
    if args.source == "digits":
        manifests = prepare_digits(args.out, args.shard_size, args.seed, args.val_fraction)
    elif args.source == "synthetic":
        if args.num_samples < 1 or args.num_classes < 1:
            raise ConfigError("--num-samples and --num-classes must be >= 1")
        manifests = prepare_synthetic(
            args.out,
            args.num_samples,
            args.shape,
            args.num_classes,
            args.seed,
            args.format,
            args.shard_size,
            args.val_fraction,
        )
    elif args.source == "photos":
        if args.num_samples < 1 or not 1 <= args.quality <= 100 or args.workers < 1:
            raise ConfigError("--num-samples and --workers must be >= 1, --quality in [1, 100]")
        manifests = prepare_photos(
            args.out,
            args.num_samples,
            seed=args.seed,
            size=args.size,
            quality=args.quality,
            shard_size=args.shard_size,
            val_fraction=args.val_fraction,
            workers=args.workers,
        )
    else:
        manifests = prepare_imagefolder(
            args.src, args.out, args.shard_size, args.seed, args.val_fraction
        )
    for split, manifest in manifests.items():
        print(_summary(str(args.out / split), manifest))
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    before = manifest_version(args.dir)
    if args.upgrade:
        manifest = upgrade_split(args.dir)
    else:
        manifest = index_split(args.dir, decompress_first=args.decompress)
    print(_summary(str(args.dir), manifest))
    if before is not None and before != VERSION:
        how = "from the manifest (shards not read)" if args.upgrade else "from the shards"
        print(f"{manifest_path(args.dir)}: upgraded from v{before} to v{VERSION}, {how}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    report = verify_split(args.dir, augment=args.augment)
    for line in report.notes + report.problems:
        print(line)
    if report.problems:
        print(f"{args.dir}: {len(report.problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{_summary(str(args.dir), read_manifest(args.dir))}: ok")
    return 0


def cmd_order(args: argparse.Namespace) -> int:
    if not 0 <= args.rank < args.world_size:
        raise ConfigError(f"--rank={args.rank} must be in [0, --world-size={args.world_size})")
    if args.epoch < 0 or args.seed < 0:
        raise ConfigError(f"--epoch={args.epoch} and --seed={args.seed} must be >= 0")
    manifest = read_manifest(args.dir)
    keys = manifest.keys  # looked up per printed sample, never loaded whole
    global_size = args.micro_size * args.accumulate * args.world_size
    plan = make_plan(len(keys), global_size, args.micro_size, args.world_size, args.drop_last)
    lo, hi = args.steps
    lo = 0 if lo is None else lo
    if not 0 <= lo <= plan.iterations_per_epoch:
        raise ConfigError(f"--steps {lo}: must start in [0, {plan.iterations_per_epoch}]")
    hi = plan.iterations_per_epoch if hi is None else min(hi, plan.iterations_per_epoch)
    member = _member_reader(args.dir, manifest, args.member) if args.member else None
    windows = ShardWindows.of(manifest.table.counts, args.window_shards)
    lines = []
    for micro in rank_micro_batches(plan, args.seed, args.epoch, args.rank, lo, windows):
        if micro.step >= hi:
            break
        for index, padded in zip(micro.indices.tolist(), micro.padded.tolist(), strict=True):
            line = keys[index] + (f"\t{member(index)}" if member else "")
            lines.append(f"{line}\tpadded" if padded else line)
    if lines:
        print("\n".join(lines))
    return 0


def _member_reader(split_dir: Path, manifest: Manifest, ext: str):
    """index -> the text of that sample's `ext` member ("-" where it has none)."""
    if ext not in manifest.extensions:
        raise DataError(f"{split_dir}: no sample has a .{ext} member")
    column, table = manifest.samples.members[ext], manifest.table

    def read(index: int) -> str:
        offset, size = (int(v) for v in column[index])
        if offset < 0:
            return "-"
        name = table.names[int(table.shard_of(np.array([index]))[0])]
        with open(split_dir / name, "rb") as f:
            return os.pread(f.fileno(), size, offset).decode("utf-8", "replace").strip()

    return read


def cmd_synth_index(args: argparse.Namespace) -> int:
    extensions = [e for e in args.extensions.split(",") if e]
    manifest = write_synthetic_index(
        args.dir, args.shards, args.samples_per_shard, extensions, args.sample_bytes
    )
    print(f"{_summary(str(args.dir), manifest)} (synthetic: no tar files)")
    return 0


COMMANDS = {
    "prepare": cmd_prepare,
    "index": cmd_index,
    "verify": cmd_verify,
    "order": cmd_order,
    "synth-index": cmd_synth_index,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # `ddp-shards order ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (BadInput, OSError) as err:  # OSError: a path that cannot be read or written
        print(f"ddp-shards {args.command}: error: {err}", file=sys.stderr)
        return BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
