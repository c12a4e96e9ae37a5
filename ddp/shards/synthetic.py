"""A synthetic manifest v2 of any size, without tar files.

What scales with N (the plan, the epoch order, the trainer's set-up of the order and
the index, `ddp-shards order`) can then be measured at a billion samples on a laptop:
the shard table is real (names, sizes, sha256-sized checksums), the per-sample member
columns have their real shape but are holes in sparse files (no disk, zeros when read),
and samples are named by shard and position ("shard-000003.tar#17"). There are no
shards to read: a loader over it fails on the first missing shard, by design.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ddp.errors import ConfigError, DataError
from ddp.shards.columns import PositionalKeys, SampleColumns, write_sparse_columns
from ddp.shards.index import find_shards
from ddp.shards.manifest import Manifest, ShardTable, read_manifest, write_json

SHARD_NAME = "shard-{:06d}.tar"


def write_synthetic_index(
    split_dir: str | os.PathLike,
    num_shards: int,
    samples_per_shard: int,
    extensions: Sequence[str] = ("cls", "npy"),
    sample_bytes: int = 4096,
) -> Manifest:
    """Write manifest.json and sparse index files for num_shards × samples_per_shard
    samples into `split_dir`; return the manifest as a reader sees it."""
    if num_shards < 1 or samples_per_shard < 1 or sample_bytes < 1 or not extensions:
        raise ConfigError(
            "a synthetic index needs >= 1 shard, >= 1 sample per shard, sample bytes >= 1 "
            "and at least one extension"
        )
    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    if find_shards(split_dir):
        raise DataError(f"{split_dir}: holds tar shards; a synthetic index would misdescribe them")
    names = [SHARD_NAME.format(i) for i in range(num_shards)]
    counts = np.full(num_shards, samples_per_shard, dtype=np.int64)
    table = ShardTable(
        names,
        counts * sample_bytes,
        counts,
        [hashlib.sha256(name.encode()).hexdigest() for name in names],  # the size of real ones
        member_counts={ext: counts for ext in extensions},  # every sample has every member
    )
    meta = {
        "source": "ddp-shards synth-index",
        "synthetic": True,
        "extensions": list(extensions),
        "sample_bytes": sample_bytes,
    }
    columns = SampleColumns({}, {}, PositionalKeys(names, table.starts))
    entry = write_sparse_columns(split_dir, table.num_samples, extensions, sample_bytes)
    write_json(split_dir, {**Manifest(table, columns, meta).to_json(), "index": entry})
    return read_manifest(split_dir)
