"""The process group and the device: started once per job, passed explicitly as `DistEnv`.

Restarts under torchrun are handled here (measured with bench/exit_trials.py). The c10d
rendezvous shares one TCPStore server, owned by the elastic agent, across every attempt
of the job (the agent keeps `_shared_tcp_store_server`; the "new TCPStore for every
retry" comment in torch.distributed.rendezvous no longer holds). `init_process_group`
writes gloo's listening addresses under keys made of group name, device and rank only,
the same in every attempt, so a restarted rank can read its peer's address from the dead
attempt and fail in gloo's connectFullMesh with "Connection refused" (unless the peer
overwrote the key first: a race). `_attempt_store` prefixes all keys with the restart
count so each attempt has its own namespace (what torch itself did before the shared store).
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ddp.distributed.env import Launch
from ddp.distributed.network import use_interface_towards_master
from ddp.errors import ConfigError


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


def pick_device(requested: str, launch: Launch, backend: str = "auto") -> torch.device:
    """This process's device: GPU `local_rank` on CUDA (one process per GPU), else the CPU.
    With the gloo backend several ranks may share a GPU (rank i on GPU i mod count).
    ConfigError when there is no GPU for this process (before any process group)."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("trainer.device=cuda but CUDA is not available")
        gpus = torch.cuda.device_count()
        if launch.local_world_size > gpus and backend != "gloo":
            raise ConfigError(
                f"{launch.local_world_size} processes on this node but {gpus} GPU(s) visible: "
                f"start at most {gpus} (one per GPU), or trainer.device=cpu"
            )
        index = launch.local_rank % gpus
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(requested)


# A Hydra multirun under torchrun (`torchrun ... -m ddp.train -m ...`) starts one process
# group per sweep point in the same processes: each needs fresh keys too, or the second
# group's gloo rendezvous reads the first one's addresses. Every rank runs the same points
# in the same order, so the counters agree.
_groups_started = itertools.count()


def _attempt_store(launch: Launch, timeout: dt.timedelta) -> dist.Store:
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
        world_size=launch.world_size,
        is_master=launch.rank == 0 and not agent_hosts_store,
        timeout=timeout,
        multi_tenant=True,
    )
    prefix = f"ddp/attempt_{launch.restart_count}/group_{next(_groups_started)}"
    return dist.PrefixStore(prefix, store)


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


def init_distributed(
    launch: Launch, device: torch.device, timeout_s: float = 600.0, backend: str = "auto"
) -> DistEnv:
    """Start the process group (world_size > 1) with a timeout on every collective.

    A rendezvous port already taken by another program is bad input, not a crash:
    ConfigError naming the address. Across hosts, gloo and NCCL bind to the interface of
    the route to MASTER_ADDR unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME say otherwise
    (ddp.distributed.network).
    """
    if launch.world_size == 1:
        backend = None
    else:
        _export_submitit_env()
        route = use_interface_towards_master(launch)
        if route is not None and launch.local_rank == 0:  # one line per host
            print(
                f"network: {route.interface} ({route.source}) towards MASTER_ADDR "
                f"{os.environ['MASTER_ADDR']} ({route.destination})",
                flush=True,
            )
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = dt.timedelta(seconds=timeout_s)
        try:
            dist.init_process_group(
                backend=backend,
                store=_attempt_store(launch, timeout),
                rank=launch.rank,
                world_size=launch.world_size,
                timeout=timeout,
                device_id=device if backend == "nccl" else None,
            )
        except RuntimeError as exc:  # DistNetworkError & co. carry the store's message
            text = str(exc)
            if "address already in use" in text.lower() or "EADDRINUSE" in text:
                addr = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
                raise ConfigError(
                    f"MASTER_ADDR:MASTER_PORT={addr} is already in use; pick a free port"
                ) from exc
            raise
    return DistEnv(
        rank=launch.rank,
        local_rank=launch.local_rank,
        world_size=launch.world_size,
        local_world_size=launch.local_world_size,
        device=device,
        backend=backend,
    )


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
