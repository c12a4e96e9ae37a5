"""Memory: each epoch's peak, and what a CUDA out-of-memory leaves behind.

- `peak_memory`: CUDA: the most the caching allocator had allocated and reserved since
  the last call (then reset); CPU: the process's peak resident set since it started
  (the kernel keeps no per-epoch peak).
- `trainer.memory_snapshot=true` records the allocator's history from the start
  (torch.cuda.memory._record_memory_history); an out-of-memory dumps it into the run
  directory as memory_snapshot_rank<R>.pickle (open at https://pytorch.org/memory_viz).
- `out_of_memory`: a CUDA out-of-memory in the loop becomes one line naming the
  micro-batch and the knob (batch.micro_size), exit 2; the checkpoints stay as they are.
"""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator
from pathlib import Path

import torch

from ddp.errors import BadInput, ConfigError

GB = 1e9
HISTORY_ENTRIES = 100_000
"""Allocator events a snapshot keeps (the most recent), as torch's docs suggest."""


def peak_memory(device: torch.device) -> dict[str, float]:
    """memory/peak_gb (and on CUDA memory/reserved_gb) since the last call."""
    if device.type == "cuda":
        allocated = torch.cuda.max_memory_allocated(device) / GB
        reserved = torch.cuda.max_memory_reserved(device) / GB
        torch.cuda.reset_peak_memory_stats(device)
        return {"memory/peak_gb": allocated, "memory/reserved_gb": reserved}
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"memory/peak_gb": kib * 1024 / GB}


def start_snapshot(enabled: bool, device: torch.device) -> None:
    """trainer.memory_snapshot: record the CUDA allocator's history from here on, for a
    snapshot on out-of-memory; refused on a CPU (it would record nothing)."""
    if not enabled:
        return
    if device.type != "cuda":
        raise ConfigError(
            f"trainer.memory_snapshot=true records CUDA allocations: not on {device.type} "
            "(trainer.device); set it false"
        )
    torch.cuda.memory._record_memory_history(max_entries=HISTORY_ENTRIES)


class OutOfMemory(BadInput):
    """A CUDA out-of-memory in training: a micro-batch too large for the device."""


@contextlib.contextmanager
def out_of_memory(run_dir: Path, micro_size: int, rank: int, snapshot: bool) -> Iterator[None]:
    """Turn a CUDA out-of-memory into OutOfMemory (exit 2, one line), after dumping the
    allocator's history when it was recorded."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        where = f"rank {rank}"
        if snapshot:
            path = run_dir / f"memory_snapshot_rank{rank}.pickle"
            torch.cuda.memory._dump_snapshot(str(path))
            torch.cuda.memory._record_memory_history(enabled=None)
            seen = f"memory snapshot {path} (open it at https://pytorch.org/memory_viz)"
        else:
            seen = "trainer.memory_snapshot=true records a snapshot to see what held it"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
        raise OutOfMemory(
            f"CUDA out of memory on {where} with batch.micro_size={micro_size} ({first}); "
            f"{seen}; lower batch.micro_size (accumulation keeps the global batch) or set "
            "batch.micro_size=auto"
        ) from exc
