"""Tar shards in WebDataset layout, with a manifest that indexes every sample."""

from ddp.shards.index import index_shard, index_split
from ddp.shards.manifest import Manifest, ShardInfo, SplitIndex, read_manifest, write_manifest
from ddp.shards.verify import SplitReport, verify_split
from ddp.shards.writer import ShardWriter

__all__ = [
    "Manifest",
    "ShardInfo",
    "ShardWriter",
    "SplitIndex",
    "SplitReport",
    "index_shard",
    "index_split",
    "read_manifest",
    "verify_split",
    "write_manifest",
]
