"""Process environment: one code path for plain python, torchrun and srun.

`init_distributed` returns a frozen `DistEnv` that is passed explicitly; nothing
here is a module global. Control-flow decisions go through the named
collectives `all_agree` and `any_rank`, or, once per training step, through
`StepSums` (carried by the gradient all-reduce), so every rank takes the same branch.

Two torch/gloo pitfalls are handled here (measured with bench/exit_trials.py):

* Restarts under torchrun. The c10d rendezvous shares one TCPStore server, owned
  by the elastic agent, across every attempt of the job (the agent keeps
  `_shared_tcp_store_server`; the "new TCPStore for every retry" comment in
  torch.distributed.rendezvous no longer holds). `init_process_group` writes
  gloo's listening addresses under keys made of group name, device and rank
  only, the same in every attempt, so a restarted rank can read its peer's
  address from the dead attempt and fail in gloo's connectFullMesh with
  "Connection refused" (unless the peer overwrote the key first: a race).
  `_attempt_store` prefixes all keys with TORCHELASTIC_RESTART_COUNT so each
  attempt has its own namespace (what torch itself did before the shared store).
* Exit. gloo runs collectives on its own worker threads, and a worker drops its
  reference to a finished work object (e.g. the last barrier's) a moment after
  the caller's wait() returned. That object's captured ThreadLocalState holds a
  Python object, so its destructor takes the GIL. If the main thread has already
  reached Py_FinalizeEx, CPython ends the worker with pthread_exit inside that
  (noexcept) destructor, and libstdc++ calls std::terminate: "terminate called
  without an active exception", SIGABRT, exit code -6, in about 1 run of 6 on a
  loaded 2-core machine. destroy_process_group does not join these threads (the
  process group lives on while DDP references it) and a barrier only produces
  one more such work object. `exit_process` runs the Python exit handlers and
  then leaves with os._exit, so no interpreter finalization races the workers.
"""

from __future__ import annotations

import atexit
import datetime as dt
import itertools
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


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


def restart_count() -> int:
    """How many times torchrun has restarted the worker group (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but CUDA is not available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(requested)


# A Hydra multirun under torchrun (`torchrun ... -m ddp.train -m ...`) starts one process
# group per sweep point in the same processes: each needs fresh keys too, or the second
# group's gloo rendezvous reads the first one's addresses. Every rank runs the same points
# in the same order, so the counters agree.
_groups_started = itertools.count()


def _attempt_store(rank: int, world_size: int, timeout: dt.timedelta) -> dist.Store:
    """The rendezvous store, with keys private to this torchrun attempt.

    Under torchrun the agent hosts the TCPStore and it outlives a restart: without
    the prefix, attempt N would read gloo addresses written by attempt N-1.
    Elsewhere (srun + MASTER_ADDR, or TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) rank 0
    hosts it, as torch's env:// does.
    """
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise RuntimeError("MASTER_ADDR/MASTER_PORT are not set: launch with torchrun")
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        world_size=world_size,
        is_master=rank == 0 and not agent_hosts_store,
        timeout=timeout,
        multi_tenant=True,
    )
    return dist.PrefixStore(f"ddp/attempt_{restart_count()}/group_{next(_groups_started)}", store)


def _export_submitit_env() -> None:
    """Hydra's submitit launcher runs the trainer in-process in every SLURM task, with no
    torchrun to set MASTER_ADDR/MASTER_PORT: derive them from the job (first node, a port
    seeded by the job id), the same on every task, plus RANK/LOCAL_RANK/WORLD_SIZE."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or "MASTER_ADDR" in os.environ:
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) < 2:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Start the process group (world_size > 1) with a timeout on every collective."""
    _export_submitit_env()
    ranks = detect()
    dev = pick_device(device, ranks["local_rank"])
    backend = None
    if ranks["world_size"] > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = dt.timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend=backend,
            store=_attempt_store(ranks["rank"], ranks["world_size"], timeout),
            rank=ranks["rank"],
            world_size=ranks["world_size"],
            timeout=timeout,
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistEnv(device=dev, backend=backend, **ranks)


def shutdown(env: DistEnv, timeout_s: float = 60.0) -> None:
    """Leave together, then tear the process group down.

    The barrier keeps a fast rank from closing its sockets while a peer is still
    in its last collective ("Connection closed by peer" there). Its timeout
    bounds the wait when a peer is already gone; teardown happens regardless.
    """
    if not (env.distributed and dist.is_initialized()):
        return
    try:
        dist.barrier(timeout=dt.timedelta(seconds=timeout_s))
    finally:
        dist.destroy_process_group()


_retired: list[Any] = []


def retire(*objects: Any) -> None:
    """Keep objects that own the process group (the DDP module) alive until exit_process.

    Freeing them destroys the ProcessGroupGloo, which joins its worker threads while the
    main thread holds the GIL; a worker still releasing a finished work object needs the
    GIL to drop its tensors: a deadlock (seen between the points of a sweep under
    torchrun). exit_process never runs those destructors.
    """
    _retired.extend(objects)


def exit_process(code: int = 0) -> NoReturn:
    """End the process with `code`, skipping interpreter finalization.

    Call it last in the trainer's entry point, after `shutdown`, with the code
    SLURM and CI should see. Python's atexit handlers still run (W&B,
    multiprocessing/DataLoader worker cleanup, logging) and stdio is flushed;
    only Py_FinalizeEx is skipped, the phase in which a gloo worker thread that
    releases its last work object is ended by CPython inside a noexcept C++
    destructor and aborts the process (SIGABRT, see the module docstring).
    (`atexit._run_exitfuncs` is undocumented but present in every CPython 3.)
    """
    try:
        atexit._run_exitfuncs()
        logging.shutdown()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed or broken pipe must not change the exit code
                pass
        os._exit(code)


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


class StepSums:
    """Per-step numbers every rank needs summed over all ranks, carried by the step's own
    gradient all-reduce instead of a collective of their own.

    Two kinds of values: device ones (a 1-D tensor, e.g. loss sum, correct, samples: no
    host sync to hand them over) set by the training step before its synchronizing
    backward, and host ones (counts, and flags such as "preempt" where a sum > 0 means
    "some rank raised it"). A DDP communication hook appends them to the first gradient
    bucket (DDP's smallest, 1 MiB at most) of each synchronizing backward; `no_sync`
    micro-batches reduce nothing. Gradients are averaged as DDP's default hook does
    (divide by the world size, then sum). Without a process group the sums are this
    process's own. With these sums in an all-reduce of their own, the digits MLP on 2
    CPU processes ran at 0.72x the steps/s (bench/overhead.py --candidate).
    """

    def __init__(
        self,
        env: DistEnv,
        ddp_model: Any = None,
        device_keys: tuple[str, ...] = (),
        host_keys: tuple[str, ...] = (),
    ):
        self.device_keys, self.host_keys = device_keys, host_keys
        self._env = env
        self._device_values = torch.zeros(len(device_keys), device=env.device)
        self._host_values = [0.0] * len(host_keys)
        self._host_tensor = torch.zeros(len(host_keys), device=env.device)
        self._reduced: torch.Tensor | None = None
        """Set by the hook: the sums rode on this step's gradients."""
        if env.distributed and ddp_model is not None:
            ddp_model.register_comm_hook(self, _all_reduce_with_sums)

    def set_host(self, **values: float) -> None:
        """This rank's host values, before the step (copied to the device now, so the
        hook inside backward never waits for a host-to-device copy)."""
        for key, value in values.items():
            self._host_values[self.host_keys.index(key)] = float(value)
        host = torch.tensor(self._host_values, dtype=torch.float32)
        if self._env.device.type == "cuda":
            host = host.pin_memory().to(self._env.device, non_blocking=True)
        self._host_tensor = host

    def set_device(self, values: torch.Tensor) -> None:
        """This rank's device values, in `device_keys` order, before the last backward."""
        self._device_values = values

    def _packed(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.cat([self._device_values.to(dtype), self._host_tensor.to(dtype)])

    def result(self) -> dict[str, float]:
        """Every value summed over the ranks; clears them for the next step."""
        if self._reduced is not None:
            summed = self._reduced
        else:  # no process group, or a backward that reduced no gradient: sum alone
            summed = all_reduce_sum(self._packed(torch.float32), self._env)
        values = summed.tolist()
        self._reduced = None
        self._host_values = [0.0] * len(self.host_keys)
        self._host_tensor = torch.zeros(len(self.host_keys), device=self._env.device)
        return dict(zip(self.device_keys + self.host_keys, values, strict=True))


def _all_reduce_with_sums(sums, bucket):  # unannotated: DDP checks annotations as objects
    """DDP comm hook (state: the StepSums, bucket: a dist.GradBucket) -> Future[Tensor]."""
    grads = bucket.buffer().div_(dist.get_world_size())
    if bucket.index() != 0 or grads.dtype not in (torch.float32, torch.float64):
        # (half-precision gradients would round the sums: they take the fallback)
        return dist.all_reduce(grads, async_op=True).get_future().then(lambda f: f.value()[0])
    n = grads.numel()
    packed = torch.cat([grads, sums._packed(grads.dtype)])

    def unpack(fut: torch.futures.Future) -> torch.Tensor:
        reduced = fut.value()[0]
        sums._reduced = reduced[n:].float()
        return reduced[:n]  # the gradients must come first: DDP reads them from offset 0

    return dist.all_reduce(packed, async_op=True).get_future().then(unpack)


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
