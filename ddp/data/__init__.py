"""Micro-batches for the trainer, in small modules (import the one you need):

- `splits`: which splits a config names and how many samples they hold (no torch).
- `batch`: `Batch`, `LoaderOptions`, and `TrainBatches`, the contract every training
  loader meets.
- `samples`: member bytes -> arrays, shared by both loaders.
- `images`: image members decoded and augmented (data.augment), on the host or the device.
- `dataset`: `ShardDataset`, random access into tar shards by manifest offsets.
- `memory`: `MemorySplit`, a small split decoded once and served from memory.
- `loaders`: `TrainLoader` and `EvalLoader` over a dataset or a memory split.
- `remote`: `http(s)://` and `s3://` objects fetched, with retries up to a timeout.
- `cache`: remote splits read as local ones, their shards fetched whole into a bounded,
  verified cache shared by a node's processes, prefetched in the epoch order's order.
- `streaming`: `StreamLoader`, shards behind URLs read front to back.
"""
