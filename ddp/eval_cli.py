"""`ddp-eval RUN_OR_CHECKPOINT [key=value ...]`: loss, accuracy and the confusion matrix
of a trained model on a split, exact across ranks, printed and written as JSON.

    ddp-eval runs/digits                                  # best.pt on the validation split
    ddp-eval runs/digits/checkpoints/last.pt --split train
    torchrun --standalone --nproc-per-node=2 -m ddp.eval_cli runs/digits data.root=/new/place

Overrides change the checkpoint's own config (e.g. where the data now lives). The JSON
goes to --out, else RUN/eval-<split>.json beside the checkpoint's run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ddp import checkpoint
from ddp.build import autocast_for, loader_options
from ddp.data.loaders import build_eval_loader
from ddp.data.splits import open_named_split
from ddp.distributed.env import detect
from ddp.distributed.exit import ExitCode, exit_process
from ddp.distributed.group import init_distributed, pick_device, shutdown
from ddp.errors import BadInput
from ddp.inference import load_trained, rebuild
from ddp.step import evaluate


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ddp-eval", description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a run directory or a checkpoint file")
    parser.add_argument("overrides", nargs="*", help="key=value changes to its config")
    parser.add_argument("--split", help="the split to evaluate (default: data.val_split)")
    parser.add_argument("--out", type=Path, help="where to write the JSON")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    launch = detect()
    state, config, ckpt = load_trained(args.path, args.overrides)
    device = pick_device(config.trainer.device, launch, config.trainer.backend)
    model, pipeline = rebuild(state, config, device, str(ckpt))
    split = args.split or config.data.val_split
    where, split_dir, manifest, remote = open_named_split(config.data, split)
    num_classes = config.model.get("num_classes") or manifest.meta.get("num_classes")
    options = loader_options(config, device)
    loader = build_eval_loader(
        split_dir,
        config.batch.micro_size,
        launch.rank,
        launch.world_size,
        options,
        manifest,
        remote=remote,
    )
    env = init_distributed(launch, device, config.trainer.timeout_s, config.trainer.backend)
    metrics = evaluate(model, loader, env, autocast_for(config, device), pipeline, num_classes)
    shutdown(env)
    return {
        "checkpoint": str(ckpt),
        "split": where,
        "samples": int(metrics["val/samples"]),
        "loss": metrics["val/loss"],
        "accuracy": metrics["val/accuracy"],
        "classes": manifest.meta.get("classes"),
        "confusion": metrics.get("val/confusion"),
        "main": env.is_main,
    }


def report(result: dict, out: Path) -> str:
    lines = [
        f"{result['checkpoint']} on {result['split']}: {result['samples']:,} samples, "
        f"loss {result['loss']:.4f}, accuracy {result['accuracy']:.4f}"
    ]
    if result["confusion"]:
        names = result["classes"] or [str(i) for i in range(len(result["confusion"]))]
        width = max(6, *(len(n) for n in names))
        lines.append("confusion (rows: true class, columns: predicted)")
        lines.append(" " * width + "".join(f"{n:>{width}}" for n in names))
        for name, row in zip(names, result["confusion"], strict=True):
            lines.append(f"{name:>{width}}" + "".join(f"{v:>{width}}" for v in row))
    lines.append(f"written to {out}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    code = ExitCode.OK
    try:
        result = run(args)
        if result.pop("main"):
            run_dir = checkpoint.run_dir_of(Path(result["checkpoint"]))
            split = Path(result["split"]).name
            out = args.out or (run_dir or Path(".")) / f"eval-{split}.json"
            out.write_text(json.dumps(result, indent=2))
            print(report(result, out), flush=True)
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        code = ExitCode.BAD_INPUT
    exit_process(int(code))


if __name__ == "__main__":
    main()
