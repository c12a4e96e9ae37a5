"""What the commands after training share: a checkpoint found from a run or a file, the
model it trained rebuilt with its config, and the pipeline its inputs went through."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ddp import checkpoint
from ddp.build import build_model, input_pipeline
from ddp.compose import from_record
from ddp.config import Config
from ddp.data.device import InputPipeline


def load_trained(path: Path, overrides: list[str]) -> tuple[dict[str, Any], Config, Path]:
    """A run's (or a file's) checkpoint and the config it trained with, overrides on top."""
    ckpt = checkpoint.find(path)
    state = checkpoint.load(ckpt)
    return state, from_record(state["config"], overrides), ckpt


def rebuild(
    state: dict[str, Any], config: Config, device: torch.device, source: str
) -> tuple[torch.nn.Module, InputPipeline]:
    """The trained model, in eval mode on `device`, and the input pipeline it trained behind."""
    model = build_model(config, device)
    checkpoint.load_weights(model, state["model"], source)
    model.eval()
    return model, input_pipeline(config, model, device)
