"""Process environment: one code path for plain python, torchrun and srun.

`init_distributed` returns a frozen `DistEnv` that is passed explicitly; nothing
here is a module global. Control-flow decisions go through the named
collectives `all_agree` and `any_rank` so every rank takes the same branch.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str | None
    """None when world_size == 1 and no process group was started."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _from_torchrun() -> dict[str, int] | None:
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return None
    return {
        "rank": int(os.environ["RANK"]),
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "world_size": int(os.environ["WORLD_SIZE"]),
        "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])),
    }


def _from_slurm() -> dict[str, int] | None:
    """srun launching the trainer directly, one task per process."""
    if "SLURM_PROCID" not in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) < 2:
        return None
    return {
        "rank": int(os.environ["SLURM_PROCID"]),
        "local_rank": int(os.environ["SLURM_LOCALID"]),
        "world_size": int(os.environ["SLURM_NTASKS"]),
        "local_world_size": int(os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]),
    }


def _local() -> dict[str, int]:
    return {"rank": 0, "local_rank": 0, "world_size": 1, "local_world_size": 1}


def detect() -> dict[str, int]:
    """Rank, local rank and world size from whichever launcher started us."""
    return _from_torchrun() or _from_slurm() or _local()


def world_size_from_env() -> int:
    return detect()["world_size"]


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but CUDA is not available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(requested)


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    ranks = detect()
    dev = pick_device(device, ranks["local_rank"])
    backend = None
    if ranks["world_size"] > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if "MASTER_ADDR" not in os.environ:  # srun without torchrun
            raise RuntimeError("MASTER_ADDR/MASTER_PORT are not set: launch with torchrun")
        dist.init_process_group(
            backend=backend,
            rank=ranks["rank"],
            world_size=ranks["world_size"],
            timeout=dt.timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistEnv(device=dev, backend=backend, **ranks)


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _reduce_flag(flag: bool, env: DistEnv, op: dist.ReduceOp) -> bool:
    if not env.distributed:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=env.device)
    dist.all_reduce(t, op=op)
    return bool(t.item())


def all_agree(flag: bool, env: DistEnv) -> bool:
    """True on every rank iff `flag` is True on every rank."""
    return _reduce_flag(flag, env, dist.ReduceOp.MIN)


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank iff `flag` is True on at least one rank."""
    return _reduce_flag(flag, env, dist.ReduceOp.MAX)


def broadcast_object(obj, env: DistEnv):
    """Rank 0's `obj` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank_flags(env: DistEnv, **flags: bool) -> dict[str, bool]:
    """Several `any_rank` decisions in one collective (one all_reduce per step, not three)."""
    if not env.distributed:
        return flags
    t = torch.tensor([int(v) for v in flags.values()], dtype=torch.int32, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return {name: bool(v) for name, v in zip(flags, t.tolist(), strict=True)}


def all_gather_object(obj, env: DistEnv) -> list:
    """Every rank's `obj`, indexed by rank, on every rank."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def exit_process(code: int) -> None:
    """End the process with `code` (placeholder until the gloo teardown fix lands)."""
    sys.exit(code)
