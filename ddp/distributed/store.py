"""torchrun's store, reached before any process group exists.

Under torchrun the agent hosts a TCPStore for the whole job (MASTER_ADDR/MASTER_PORT,
TORCHELASTIC_USE_AGENT_STORE), across hosts too: ranks can meet there while they are
still checking their input (one error line per job, ddp.distributed.say_once; the
micro-batch that fits everywhere, ddp.micro_size).
"""

from __future__ import annotations

import datetime as dt
import os

import torch.distributed as dist


def agent_store(timeout: dt.timedelta) -> dist.Store | None:
    """A client of torchrun's store; None outside torchrun or when it cannot be reached."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    try:
        return dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timeout,
        )
    except Exception:  # noqa: BLE001 - unreachable or gone: the caller does without
        return None
