"""The collectives the trainer uses, named for the decision they make.

Every control-flow decision goes through one of these (or, once per step, through
`ddp.distributed.step_sums`), so every rank takes the same branch. Without a process group
each is the identity.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ddp.distributed.group import DistEnv

T = TypeVar("T")


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


def broadcast_object(obj: T, env: DistEnv) -> T:
    """Rank 0's `obj` on every rank."""
    if not env.distributed:
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_bytes(payload: bytes, env: DistEnv, capacity: int = 1 << 15) -> list[bytes]:
    """Every rank's `payload`, indexed by rank, in one all_gather of fixed-size buffers
    (all_gather_object takes two collectives and pickles). A payload over `capacity`
    bytes makes every rank take a second round through all_gather_object."""
    if not env.distributed:
        return [payload]
    size = len(payload) if len(payload) <= capacity else -1
    buffer = torch.zeros(8 + capacity, dtype=torch.uint8)
    buffer[:8] = torch.frombuffer(
        bytearray(size.to_bytes(8, "little", signed=True)), dtype=torch.uint8
    )
    if size > 0:
        buffer[8 : 8 + size] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    gathered = [torch.empty_like(buffer, device=env.device) for _ in range(env.world_size)]
    dist.all_gather(gathered, buffer.to(env.device))
    raw = [g.cpu().numpy().tobytes() for g in gathered]
    sizes = [int.from_bytes(r[:8], "little", signed=True) for r in raw]
    if min(sizes) < 0:
        return all_gather_object(payload, env)
    return [r[8 : 8 + n] for r, n in zip(raw, sizes, strict=True)]


def all_gather_object(obj: T, env: DistEnv) -> list[T]:
    """Every rank's `obj`, indexed by rank, on every rank."""
    if not env.distributed:
        return [obj]
    out: list = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()
