"""Checkpoints: everything needed to continue as if nothing happened.

Written atomically (temporary file in the same directory, fsync, rename, fsync
of the directory), so a kill at any instant leaves the previous checkpoint
loadable. Read back with `torch.load(weights_only=True)`: plain containers and
tensors only, nothing a foreign file could use to run code.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

FORMAT = "ddp-checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def atomic_save(obj: Any, path: Path) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_copy(source: Path, path: Path) -> None:
    """`path` becomes a byte copy of `source` (best.pt from last.pt: no second pickling)."""
    with open(source, "rb") as src:
        _atomic_write(path, lambda f: shutil.copyfileobj(src, f, 1 << 20))


def _atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a crash
    finally:
        os.close(dir_fd)


def load(path: Path) -> dict[str, Any]:
    """Load and check a checkpoint written by `atomic_save` of `make_state`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unsafe to load: {first_line}"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} was not written by ddp ({FORMAT} expected)")
    return state


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_python_random_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_python_random_state(state: Any) -> tuple:
    # weights_only loading turns tuples into lists in some torch versions.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def has_nonfinite(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(
        t.is_floating_point() and not torch.isfinite(t).all()
        for t in state_dict.values()
        if isinstance(t, torch.Tensor)
    )
