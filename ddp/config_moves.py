"""Config keys that moved into groups (issue 24), for what was written before the move:
a checkpoint's or metrics.jsonl's config record is upgraded to the new paths, and an old
key on the command line is told where it went."""

from __future__ import annotations

import copy
import re
from typing import Any

MOVED_KEYS = {
    "data.num_workers": "data.loader.num_workers",
    "data.pin_memory": "data.loader.pin_memory",
    "data.prefetch_factor": "data.loader.prefetch_factor",
    "data.on_error": "data.loader.on_error",
    "data.in_memory_max_mb": "data.loader.in_memory_max_mb",
    "data.on_device": "data.loader.on_device",
    "data.cache_dir": "data.remote.cache_dir",
    "data.cache_max_gb": "data.remote.cache_max_gb",
    "data.remote_timeout_s": "data.remote.timeout_s",
    "data.s3_endpoint": "data.remote.s3_endpoint",
    "data.prefetch_shards": "data.remote.prefetch_shards",
    "data.urls": "data.stream.urls",
    "data.num_samples": "data.stream.num_samples",
    "data.shuffle_buffer": "data.stream.shuffle_buffer",
    "trainer.checkpoint_every_steps": "trainer.checkpoint.every_steps",
    "trainer.checkpoint_every_minutes": "trainer.checkpoint.every_minutes",
    "trainer.compile": "trainer.compile.enabled",
    "trainer.compile_mode": "trainer.compile.mode",
    "trainer.compile_backend": "trainer.compile.backend",
}
"""Keys that moved into groups (issue 24): old path -> new path."""


def upgrade_record(record: dict[str, Any]) -> dict[str, Any]:
    """A config record as written before issue 24 (a checkpoint's `config`, the `config`
    of metrics.jsonl's plan record), with MOVED_KEYS at their new paths, so that such a
    run resumes, evaluates and reports as before. A new record comes back equal; the
    argument is not changed."""
    record = copy.deepcopy(record)
    moved = {}
    for old, new in MOVED_KEYS.items():
        group, key = old.split(".")
        section = record.get(group)
        if not isinstance(section, dict) or key not in section:
            continue
        if new.startswith(f"{old}.") and isinstance(section[key], dict):
            continue  # trainer.compile: the group itself already
        moved[new] = section.pop(key)
    for new, value in moved.items():
        *groups, key = new.split(".")
        section = record
        for name in groups:
            section = section.setdefault(name, {})
        section[key] = value
    return record


def moved_key_hint(message: str) -> str:
    """Hydra's refusal of an override (`message`), plus where the key moved when it names
    one of MOVED_KEYS: a command line written before issue 24 says what to write now."""
    for old, new in MOVED_KEYS.items():
        if re.search(rf"(?<![\w.]){re.escape(old)}(?![\w.])", message):
            return f"{message} ({old} is {new} now)"
    return message
