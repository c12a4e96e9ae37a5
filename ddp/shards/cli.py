"""`ddp-shards`: prepare, index, verify shards, and print the order a rank reads.

Exit codes: 0 fine, 1 `verify` found problems, 2 bad input (missing or corrupt
data, bad arguments), each with one line naming the culprit.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ddp.order import rank_micro_batches
from ddp.plan import PlanError, make_plan
from ddp.shards.index import index_split
from ddp.shards.manifest import DataError, Manifest, read_manifest
from ddp.shards.prepare import (
    prepare_digits,
    prepare_imagefolder,
    prepare_photos,
    prepare_synthetic,
)
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

    verify = commands.add_parser("verify", help="checksums, counts, decodability")
    verify.add_argument("dir", type=Path)

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
        "--member",
        metavar="EXT",
        help="also print this text member of each sample (e.g. source: the file it came from)",
    )
    return parser


def _summary(name: str, manifest: Manifest) -> str:
    return f"{name}: {manifest.num_samples:,} samples in {len(manifest.shards)} shards"


def cmd_prepare(args: argparse.Namespace) -> int:
    if args.shard_size < 1:
        raise ValueError(f"--shard-size={args.shard_size} must be >= 1")
    if args.source == "digits":
        manifests = prepare_digits(args.out, args.shard_size, args.seed, args.val_fraction)
    elif args.source == "synthetic":
        if args.num_samples < 1 or args.num_classes < 1:
            raise ValueError("--num-samples and --num-classes must be >= 1")
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
            raise ValueError("--num-samples and --workers must be >= 1, --quality in [1, 100]")
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
    print(_summary(str(args.dir), index_split(args.dir, decompress_first=args.decompress)))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    problems = verify_split(args.dir)
    for line in problems:
        print(line)
    if problems:
        print(f"{args.dir}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{_summary(str(args.dir), read_manifest(args.dir))}: ok")
    return 0


def cmd_order(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.dir)
    keys = [key for shard in manifest.shards for key in shard.keys]
    global_size = args.micro_size * args.accumulate * args.world_size
    plan = make_plan(len(keys), global_size, args.micro_size, args.world_size, args.drop_last)
    lo, hi = args.steps
    lo = 0 if lo is None else lo
    hi = plan.iterations_per_epoch if hi is None else min(hi, plan.iterations_per_epoch)
    member = _member_reader(args.dir, manifest, args.member) if args.member else None
    lines = []
    for micro in rank_micro_batches(plan, args.seed, args.epoch, args.rank, start_step=lo):
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
    spans = []  # (shard, offset, size) per sample index
    for shard in manifest.shards:
        absent = {"offsets": [-1] * shard.num_samples, "sizes": [0] * shard.num_samples}
        column = shard.members.get(ext, absent)
        spans += [
            (shard.name, o, n) for o, n in zip(column["offsets"], column["sizes"], strict=True)
        ]

    def read(index: int) -> str:
        name, offset, size = spans[index]
        if offset < 0:
            return "-"
        with open(split_dir / name, "rb") as f:
            return os.pread(f.fileno(), size, offset).decode("utf-8", "replace").strip()

    return read


COMMANDS = {"prepare": cmd_prepare, "index": cmd_index, "verify": cmd_verify, "order": cmd_order}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # `ddp-shards order ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (DataError, PlanError, ValueError, OSError) as err:
        print(f"ddp-shards {args.command}: error: {err}", file=sys.stderr)
        return BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
