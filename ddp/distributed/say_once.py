"""One error line per job, however many ranks find a problem.

Most refusals are found before the process group exists (a config value, a plan, a
shard), by every rank at once: each would print its `error:` line, N copies for N
processes (or N variants: each rank names the first bad sample it read). Under torchrun
every worker can reach the agent's TCPStore before any group is formed (MASTER_ADDR/
MASTER_PORT, TORCHELASTIC_USE_AGENT_STORE), across hosts too: the first rank to add 1 to
the attempt's key prints its line, the others stay silent. The line leaves in one
write(2), never glued to another process's output.

Where no such store is reachable (one process, srun without torchrun, a store that does
not answer in time), every rank prints: a duplicate beats a lost message.
"""

from __future__ import annotations

import datetime as dt
import os

from ddp.distributed.store import agent_store

STORE_TIMEOUT = dt.timedelta(seconds=5)


def say_error(message: str) -> None:
    """`error: message` on stderr, unless another rank of the job said its error first."""
    if first_to_say():
        write_line(f"error: {message}")


def write_line(line: str, fd: int = 2) -> None:
    """`line` and its newline in one write: never interleaved with another process's."""
    data = (line.rstrip("\n") + "\n").encode()
    while data:
        data = data[os.write(fd, data) :]


def first_to_say() -> bool:
    """Whether no other rank of this job (this torchrun attempt) said an error before."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    store = agent_store(STORE_TIMEOUT)
    if store is None:
        return True
    try:
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return store.add(f"ddp/errors/attempt_{attempt}", 1) == 1
    except Exception:  # noqa: BLE001 - no store to ask: say it (a duplicate beats silence)
        return True
