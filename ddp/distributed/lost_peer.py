"""A collective that failed because another rank went away: recognised, and said in one line.

gloo raises a RuntimeError from the collective (in a DDP hook, wrapped as "Got the
following error when running the callback: ..."). The texts, as observed on torch 2.13
(2 CPU processes, the peer SIGKILLed or SIGSTOPped):

- gone: "[.../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:37578: Connection
  reset by peer. ..." or "[.../pair.cc:553] Connection closed by peer [127.0.0.1]:32431. ..."
  (any collective, and every later one on the same group);
- stuck past the process group's timeout (trainer.timeout_s): "[.../gloo/transport/tcp/
  unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete" (or
  "send", unbound_buffer.cc:129).

NCCL's counterparts (from torch's and NCCL's sources, not observed here: a CUDA job
usually has NCCL's watchdog abort the process instead) are matched too. Anything else is
not a lost peer: a bug keeps its traceback.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from ddp.distributed.env import Launch, detect
from ddp.distributed.network import this_host

SIGNS = (
    (re.compile(r"connection (?:reset|closed) by peer", re.I), False),
    (re.compile(r"(?:read|write) error \[[0-9a-f.:]+\]:\d+: (?P<why>[^.]+)", re.I), False),
    (re.compile(r"remote process exited or there was a network error", re.I), False),  # NCCL
    (re.compile(r"timed out waiting \d+ ?ms for (?:send|recv) operation", re.I), True),
    (re.compile(r"watchdog caught collective operation timeout", re.I), True),  # NCCL
)
"""(pattern, stuck) in the order they are tried: the first match names the reason."""
PEER_ADDRESS = re.compile(r"\[([0-9a-fA-F.:]+)\]:(\d+)")
"""gloo's name for the other end of the pair: [ip]:port."""


@dataclass(frozen=True)
class LostPeer:
    stuck: bool
    """No answer within the timeout (the peer is stuck, or gone without closing its
    sockets), rather than a connection the peer's end closed."""
    address: str | None
    """The peer's ip:port as gloo names it, when the error says."""
    reason: str
    """The words of the error that tell what happened."""


def lost_peer(exc: BaseException) -> LostPeer | None:
    """What `exc` (or an exception it was raised from) says about a lost peer; None when
    it is not about one."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        for pattern, stuck in SIGNS:
            if match := pattern.search(text):
                where = None if stuck else PEER_ADDRESS.search(text)
                address = f"{where[1]}:{where[2]}" if where else None
                reason = (match.groupdict().get("why") or match[0]).strip().lower()
                return LostPeer(stuck, address, reason)
        exc = exc.__cause__ or exc.__context__
    return None


def peer_lost_line(exc: BaseException, timeout_s: float) -> str | None:
    """The line this process ends with when `exc` says a peer went away (exit 4, see
    ExitCode.PEER_LOST); None when it does not (a bug: let it raise)."""
    lost = lost_peer(exc)
    return None if lost is None else lost_peer_line(lost, detect(), this_host(), timeout_s)


def lost_peer_line(lost: LostPeer, launch: Launch, host: str, timeout_s: float) -> str:
    """The one line a surviving rank ends with: who it lost, as far as it can know (the
    other rank of two; the host when every rank runs on this one, or gloo's address)."""
    peer = f"rank {1 - launch.rank}" if launch.world_size == 2 else "a peer"
    address = lost.address
    if launch.world_size == launch.local_world_size:
        peer += f" on host {host}"
    elif address is not None and not _loopback(address):
        peer, address = f"{peer} at {address}", None
    if lost.stuck:
        what = f"no answer within trainer.timeout_s={timeout_s:g}: it is stuck or gone"
    else:
        where = f" [{address}]" if address else ""
        what = f"{lost.reason}{where}: it crashed or was killed, see its output"
    return (
        f"error: lost {peer} ({what}); rank {launch.rank} on host {host} stops (exit 4, peer lost)"
    )


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.rsplit(":", 1)[0]).is_loopback
    except ValueError:
        return False
