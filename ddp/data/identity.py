"""Which data a run trains on: a short digest per split, kept in every checkpoint.

A resume on other data would continue an epoch whose order means nothing there and
compare validation values measured on another set, so it is refused like a changed plan
(ddp.state.load_resume_point). Identity is content, not place: the same shards moved to
another root (local scratch, a mirror over HTTP, S3) are the same data; a shard rewritten,
added, removed or renamed is not. The digest covers what the manifest records of each
shard (name, byte size, sha256), in the manifest's order, which is also the samples'
order; streamed shards without a manifest are known by their URLs alone.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ddp.data.splits import Splits
from ddp.shards.manifest import Manifest

SPLIT_NAMES = {"train": "training", "val": "validation"}


def data_identity(splits: Splits) -> dict[str, dict[str, Any]]:
    """{"train": ..., "val": ...}, each {"digest", "shards", "samples"} (JSON-safe)."""
    if splits.train is not None:
        train = manifest_identity(splits.train)
    else:  # streaming mode: the URLs (and their sample counts, when a manifest is beside)
        stream = splits.stream
        assert stream is not None
        counts = stream.index.counts if stream.index is not None else [None] * len(stream.urls)
        rows = [f"{url}\t{count}" for url, count in zip(stream.urls, counts, strict=True)]
        train = {"digest": _digest(rows), "shards": len(rows), "samples": splits.num_train_samples}
    return {"train": train, "val": manifest_identity(splits.val)}


def manifest_identity(manifest: Manifest) -> dict[str, Any]:
    table = manifest.table
    rows = [
        f"{name}\t{int(size)}\t{sha}"
        for name, size, sha in zip(table.names, table.sizes, table.sha256, strict=True)
    ]
    return {"digest": _digest(rows), "shards": len(rows), "samples": int(table.num_samples)}


def _digest(rows: list[str]) -> str:
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def what_changed(saved: dict[str, Any] | None, now: dict[str, Any]) -> str | None:
    """The first split whose data differs from `saved` (a checkpoint's identity), said in
    words; None when they agree, or when the checkpoint predates data identities."""
    if not saved:
        return None
    for split, words in SPLIT_NAMES.items():
        before, after = saved.get(split), now.get(split)
        if before is None or after is None or before["digest"] == after["digest"]:
            continue
        if before["samples"] != after["samples"] or before["shards"] != after["shards"]:
            return f"the {words} data changed: {_size(before)} when saved, {_size(after)} now"
        return (
            f"the {words} data changed: same size ({_size(after)}) but other shards "
            f"(digest {before['digest']} when saved, {after['digest']} now)"
        )
    return None


def _size(identity: dict[str, Any]) -> str:
    samples = identity["samples"]
    count = "?" if samples is None else f"{samples:,}"
    return f"{count} samples in {identity['shards']} shard(s)"
