"""`ddp-export RUN_OR_CHECKPOINT --out FILE`: a trained model as one self-contained file.

    ddp-export runs/digits --out digits.pt2                     # torch.export program
    ddp-export runs/digits --out digits.pt --format torchscript

The file takes inputs as the loaders hand them over (e.g. uint8 images (B, H, W, C), or
the arrays as stored) and returns logits: the input pipeline the model trained behind
(scaling to [0, 1], data.normalize, memory order) is part of it. Beside it, FILE.json
holds the config, the class names, the input it was traced with, and the check: the
file loaded back gives the trained model's outputs on a batch of the validation split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ddp.build import loader_options
from ddp.compose import as_record
from ddp.data.batch import to_model_input
from ddp.data.device import InputPipeline
from ddp.data.loaders import build_eval_loader
from ddp.data.splits import open_named_split
from ddp.distributed.exit import ExitCode
from ddp.errors import BadInput
from ddp.inference import load_trained, rebuild

TOLERANCE = 1e-5


class WithInputPipeline(torch.nn.Module):
    """The model behind the pipeline its inputs went through in training."""

    def __init__(self, model: torch.nn.Module, pipeline: InputPipeline) -> None:
        super().__init__()
        self.model = model
        self.channels_last = pipeline.channels_last
        self.normalize = pipeline.mean is not None
        mean = pipeline.mean if pipeline.mean is not None else torch.zeros(0)
        std = pipeline.std if pipeline.std is not None else torch.zeros(0)
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = to_model_input(inputs)
        if self.normalize:
            x = (x - self.mean) / self.std
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)


def export(path: Path, overrides: list[str], out: Path, fmt: str) -> dict:
    state, config, ckpt = load_trained(path, overrides)
    cpu = torch.device("cpu")
    model, pipeline = rebuild(state, config, cpu, str(ckpt))
    wrapped = WithInputPipeline(model, pipeline).eval()
    _, split_dir, manifest, remote = open_named_split(config.data, config.data.val_split)
    options = loader_options(config, cpu)
    micro = config.batch.micro_size
    batch = next(iter(build_eval_loader(split_dir, micro, 0, 1, options, manifest, remote=remote)))
    example = batch.inputs
    with torch.no_grad():
        expected = wrapped(example)
        if fmt == "export":
            batch_dim = torch.export.Dim("batch", min=1)
            program = torch.export.export(wrapped, (example,), dynamic_shapes=({0: batch_dim},))
            torch.export.save(program, out)
            actual = torch.export.load(out).module()(example)
        else:
            torch.jit.save(torch.jit.trace(wrapped, (example,)), out)
            actual = torch.jit.load(out)(example)
    difference = float((actual - expected).abs().max())
    if not difference <= TOLERANCE:
        raise RuntimeError(f"{out}: loaded back, it differs from the model by {difference:g}")
    info = {
        "file": str(out),
        "format": fmt,
        "checkpoint": str(ckpt),
        "input": {"shape": ["batch", *example.shape[1:]], "dtype": str(example.dtype)},
        "output": {"shape": ["batch", *expected.shape[1:]], "meaning": "logits"},
        "classes": manifest.meta.get("classes"),
        "check": {"max_abs_difference": difference, "batch": len(example)},
        "config": as_record(config),
    }
    Path(f"{out}.json").write_text(json.dumps(info, indent=2))
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddp-export", description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a run directory or a checkpoint file")
    parser.add_argument("overrides", nargs="*", help="key=value changes to its config")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--format", choices=("export", "torchscript"), default="export")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        info = export(args.path, args.overrides, args.out, args.format)
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(ExitCode.BAD_INPUT)
    print(
        f"{info['file']}: {info['format']} of {info['checkpoint']}, input {info['input']}, "
        f"checked on {info['check']['batch']} samples (max difference "
        f"{info['check']['max_abs_difference']:.2g}); details in {info['file']}.json"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
