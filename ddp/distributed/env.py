"""Which launcher started this process: one frozen value, read once from the environment.

One method per launcher, dinov2-style, and the first that recognises its variables
wins: torchrun (also torchrun inside a SLURM job), srun starting one task per
process, else a single plain-python process. No torch import: `ddp-plan` uses it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Launch:
    launcher: Literal["torchrun", "slurm", "python"]
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    restart_count: int = 0
    """How many times torchrun has restarted the worker group (0 on the first attempt)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _from_torchrun(environ: Mapping[str, str]) -> Launch | None:
    if "TORCHELASTIC_RUN_ID" not in environ and "LOCAL_RANK" not in environ:
        return None
    return Launch(
        launcher="torchrun",
        rank=int(environ["RANK"]),
        local_rank=int(environ["LOCAL_RANK"]),
        world_size=int(environ["WORLD_SIZE"]),
        local_world_size=int(environ.get("LOCAL_WORLD_SIZE", environ["WORLD_SIZE"])),
        restart_count=int(environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
    )


def _from_slurm(environ: Mapping[str, str]) -> Launch | None:
    """srun launching the trainer directly, one task per process."""
    if "SLURM_PROCID" not in environ or int(environ.get("SLURM_NTASKS", "1")) < 2:
        return None
    return Launch(
        launcher="slurm",
        rank=int(environ["SLURM_PROCID"]),
        local_rank=int(environ["SLURM_LOCALID"]),
        world_size=int(environ["SLURM_NTASKS"]),
        local_world_size=int(environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]),
    )


def _single_process() -> Launch:
    return Launch("python", rank=0, local_rank=0, world_size=1, local_world_size=1)


def detect(environ: Mapping[str, str] | None = None) -> Launch:
    """Rank, local rank and world size from whichever launcher started us."""
    environ = os.environ if environ is None else environ
    return _from_torchrun(environ) or _from_slurm(environ) or _single_process()
