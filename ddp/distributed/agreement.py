"""Every rank runs the same job: the same code, torch, config and run directory.

Hosts of one job are started separately (one torchrun per node), so one of them can run
another checkout, another environment or other overrides. Such a job may still start
and then hang in a collective the others never enter, or train on a mix. Right after the
process group starts, every rank contributes a short fingerprint to one all_gather; a
rank that differs from rank 0 stops the job, on every rank, with one line (printed by
rank 0) naming its host and what differs, before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import socket
from functools import cache
from pathlib import Path
from typing import Any

import torch

import ddp
from ddp.distributed import collectives
from ddp.distributed.group import DistEnv
from ddp.state import Refusal

ASPECTS = {
    "code": "ddp code",
    "torch": "torch",
    "config": "resolved config",
    "run_dir": "run directory",
}


def check_same_job(env: DistEnv, config_record: dict[str, Any], run_dir: Path) -> None:
    """Refusal (exit 2, one line from rank 0) when a rank's code, torch, config or run
    directory differs from rank 0's. One all_gather (a second one only to name the
    config key that differs)."""
    if not env.distributed:
        return
    mine = fingerprint(config_record, run_dir)
    everyone = collectives.all_gather_object(mine, env)
    differ = [
        (rank, theirs, aspect)
        for rank, theirs in enumerate(everyone)
        for aspect in [next((k for k in ASPECTS if theirs[k] != everyone[0][k]), None)]
        if aspect is not None
    ]
    if not differ:
        return
    rank, theirs, aspect = differ[0]
    detail = f"{theirs[aspect]} there, {everyone[0][aspect]} on rank 0"
    if aspect == "config":  # name the first key that differs (all ranks take this branch)
        records = collectives.all_gather_object(config_record, env)
        detail = first_difference(records[rank], records[0]) or detail
    if aspect == "code":  # name the files that differ
        files = collectives.all_gather_object(source_digests(), env)
        theirs_files, ours_files = files[rank], files[0]
        names = sorted(
            n for n in {*theirs_files, *ours_files} if theirs_files.get(n) != ours_files.get(n)
        )
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            detail = f"ddp/{names[0]} differs{more}"
    others = f" (and {len(differ) - 1} other rank(s))" if len(differ) > 1 else ""
    raise Refusal(
        f"host {theirs['host']} (rank {rank}){others} runs another {ASPECTS[aspect]} than "
        f"host {everyone[0]['host']} (rank 0): {detail}; start every host with the same "
        "checkout, environment and overrides",
        shown=env.is_main,
    )


def fingerprint(config_record: dict[str, Any], run_dir: Path) -> dict[str, str]:
    """What must be equal on every rank (and this rank's host, to name it)."""
    config = json.dumps(config_record, sort_keys=True, default=str)
    return {
        "host": socket.gethostname(),
        "code": f"ddp {ddp.__version__} sources {_digest(json.dumps(source_digests()))}",
        "torch": torch.__version__,
        "config": f"config {_digest(config)}",
        "run_dir": str(run_dir.resolve()),
    }


@cache
def source_digests() -> dict[str, str]:
    """A digest of every source file of the ddp package, by path within it."""
    root = Path(ddp.__file__).resolve().parent
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        for path in sorted(root.rglob("*.py"))
    }


def first_difference(theirs: Any, ours: Any, key: str = "") -> str | None:
    """'KEY is X there, Y on rank 0' for the first key (dotted) whose values differ."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        for name in sorted(set(theirs) | set(ours), key=str):
            sub = f"{key}.{name}" if key else str(name)
            if name not in theirs or name not in ours:
                where = "there" if name in theirs else "on rank 0"
                return f"{sub} is set only {where}"
            found = first_difference(theirs[name], ours[name], sub)
            if found:
                return found
        return None
    if theirs != ours:
        return f"{key or 'the value'} is {theirs!r} there, {ours!r} on rank 0"
    return None


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]
