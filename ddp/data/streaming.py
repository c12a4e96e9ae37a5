"""Streaming mode: tar shards behind URLs, read front to back.

For shards that cannot be seeked (`pipe:` commands, http(s), object stores through
webdataset's `gopen`), the exact loader's random access is out of reach. This
loader trades exact coverage for sequential reads and keeps the one guarantee DDP
cannot live without: every rank yields exactly `plan.micro_batches_per_epoch`
micro-batches (fewer after a resume), whatever the shards and the worker count
(it is a `ddp.data.batch.TrainBatches`).

Per epoch, a pure function of (seed, epoch, rank, worker) decides what a stream
reads (`stream_share`):

- the shard order is a permutation seeded by (seed, epoch), the same on all ranks;
- rank r takes every world_size-th shard of it, and worker k every num_workers-th
  of the rank's shards, so the samples a rank reads do not depend on num_workers;
  with fewer shards than ranks (or than a rank's workers) every stream reads the
  shards it shares and keeps every world_size-th (num_workers-th) sample instead;
- a buffer shuffle seeded by (seed, epoch, rank, worker) mixes samples across the
  stream's shards.

Micro-batch j of the epoch comes from worker j % num_workers; the main process
puts them back in order, so the result is deterministic. A stream that runs out
before its quota starts over on its shards (real repeats, counted in `repeats`);
one with more stops early (its leftovers are counted in `dropped`). Resuming at a
step reads and discards the micro-batches before it: cost grows with the position.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ddp.data.batch import Batch, LoaderOptions, Transform, make_batch
from ddp.data.loaders import micro_batch_loader, stop_workers
from ddp.data.samples import LabelKey, alternatives, check_shape, decode_input
from ddp.data.splits import StreamIndex, StreamShards, open_stream
from ddp.data.stream_shards import (
    Interrupted,
    RawSample,
    StreamShare,
    buffer_shuffle,
    read_shard,
    stream_share,
)
from ddp.errors import DataError
from ddp.order import check_start_step
from ddp.plan import BatchPlan

__all__ = ["StreamLoader", "build_stream_loader"]

_MAX_SKIPPED_IN_A_ROW = 1000
"""on_error="skip" gives up on a stream that yields nothing decodable (it would
otherwise cycle over its shards for ever)."""


# --------------------------------------------------------------------------- workers


@dataclass
class _Item:
    """What a worker sends: micro-batch `position` of the epoch, or an error."""

    position: int
    batch: Batch | None
    fresh: int = 0
    """Samples behind this item (and the skipped micro-batches before it, after a
    resume) read on the stream's first pass."""
    repeats: int = 0
    error: str | None = None
    interrupted: bool = False

    def pin_memory(self, device: Any = None) -> _Item:
        """Called by DataLoader's pin-memory thread (pin_memory=True)."""
        return replace(self, batch=self.batch.pin_memory()) if self.batch is not None else self


class _StreamDataset(IterableDataset):
    """One rank's micro-batches; each DataLoader worker makes whole micro-batches
    from its own share. The epoch lives in shared memory so persistent workers see
    the main process's `set_epoch`."""

    def __init__(
        self,
        urls: list[str],
        index: StreamIndex | None,
        plan: BatchPlan,
        rank: int,
        seed: int,
        options: LoaderOptions,
        shuffle_buffer: int,
        transform: Transform | None,
    ):
        self.urls, self.index, self.plan = urls, index, plan
        self.rank, self.seed, self.options = rank, seed, options
        self.shuffle_buffer, self.transform = shuffle_buffer, transform
        self.workers = max(1, options.loader.num_workers)
        self._input_exts = alternatives(options.input_key)
        self._labels = LabelKey.parse(options.target_key, options.classes)
        self.state = torch.zeros(2, dtype=torch.int64).share_memory_()
        """[epoch, start_step] of the epoch being read."""

    def set_epoch(self, epoch: int, start_step: int) -> None:
        self.state[0], self.state[1] = epoch, start_step

    def share(self, epoch: int, worker: int) -> StreamShare:
        return stream_share(
            len(self.urls), self.seed, epoch, self.rank, self.plan.world_size, worker, self.workers
        )

    def __iter__(self) -> Iterator[_Item]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        epoch, start_step = (int(v) for v in self.state.tolist())
        try:
            yield from self._items(epoch, start_step, worker)
        except DataError as err:
            yield _Item(-1, None, error=str(err), interrupted=isinstance(err, Interrupted))

    def _items(self, epoch: int, start_step: int, worker: int) -> Iterator[_Item]:
        first = start_step * self.plan.accumulate
        positions = range(worker, self.plan.micro_batches_per_epoch, self.workers)
        if not any(p >= first for p in positions):
            return
        share = self.share(epoch, worker)
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch, self.rank, worker]))
        fresh = repeats = 0
        with contextlib.closing(self._passes(share, rng)) as samples:
            for position in positions:
                # Before the resume point only the reading counts; decode too if bad
                # samples are skipped, so the same ones are skipped as without the stop.
                decode = position >= first or self.options.loader.on_error == "skip"
                batch, passes = self._micro_batch(samples, decode)
                fresh += passes.count(0)
                repeats += len(passes) - passes.count(0)
                if position >= first:
                    yield _Item(position, batch, fresh, repeats)
                    fresh = repeats = 0

    def _passes(
        self, share: StreamShare, rng: np.random.Generator
    ) -> Iterator[tuple[RawSample, int]]:
        """The share's samples, buffer-shuffled, pass after pass: (sample, pass number)."""
        for number in range(1 << 62):
            count = 0
            for sample in buffer_shuffle(self._read_share(share), self.shuffle_buffer, rng):
                count += 1
                yield sample, number
            if count == 0:
                names = ", ".join(self.urls[s] for s in share.shards[:3]) or "no shard"
                raise DataError(
                    f"rank {self.rank}'s stream has no samples ({names}"
                    f"{', ...' if len(share.shards) > 3 else ''}): use fewer DataLoader "
                    "workers or more shards"
                )

    def _read_share(self, share: StreamShare) -> Iterator[RawSample]:
        taken = kept = 0
        for shard in share.shards:
            keys = self.index.keys[shard] if self.index else None
            start = self.index.starts[shard] if self.index else -1
            for sample in read_shard(self.urls[shard], keys, start):
                if share.rank_modulo is not None:
                    taken += 1
                    if (taken - 1) % share.rank_modulo[1] != share.rank_modulo[0]:
                        continue
                if share.worker_modulo is not None:
                    kept += 1
                    if (kept - 1) % share.worker_modulo[1] != share.worker_modulo[0]:
                        continue
                yield sample

    def _micro_batch(
        self, samples: Iterator[tuple[RawSample, int]], decode: bool
    ) -> tuple[Batch | None, list[int]]:
        """The next micro_size good samples (bad ones skipped and counted, or raised)."""
        inputs, targets, indices, passes = [], [], [], []
        skipped = 0
        while len(passes) < self.plan.micro_size:
            sample, number = next(samples)
            if not decode:
                passes.append(number)
                continue
            decoded = self._decode(sample, inputs[0] if inputs else None)
            if decoded is None:
                skipped += 1
                if skipped > _MAX_SKIPPED_IN_A_ROW and not inputs:
                    raise DataError(
                        f"{sample.url}: more than {_MAX_SKIPPED_IN_A_ROW} undecodable samples "
                        "in a row"
                    )
                continue
            inputs.append(decoded[0])
            targets.append(decoded[1])
            indices.append(sample.index)
            passes.append(number)
        if not decode:
            return None, passes
        valid = np.ones(len(targets), dtype=bool)
        batch = make_batch(
            inputs, np.array(targets), valid, np.array(indices), skipped, self.transform
        )
        return batch, passes

    def _decode(self, sample: RawSample, like: np.ndarray | None) -> tuple[np.ndarray, int] | None:
        """(input, label), or None for a bad sample when on_error="skip"."""
        try:
            found = []
            for exts in (self._input_exts, self._labels.exts):
                ext = next((e for e in exts if e in sample.members), None)
                if ext is None:
                    present = ", ".join(sorted(sample.members)) or "none"
                    raise LookupError(f"no .{' or .'.join(exts)} member (members: {present})")
                found.append(ext)
            array = check_shape(decode_input(found[0], sample.members[found[0]]), like)
            label = self._labels.decode(
                found[1], sample.members[found[1]], self.options.num_classes
            )
        except Exception as err:  # noqa: BLE001 - any decode failure is bad data
            if self.options.loader.on_error == "raise":
                kind = "" if isinstance(err, LookupError) else f"{type(err).__name__}: "
                raise DataError(f"{sample.url}: key {sample.key}: {kind}{err}") from err
            return None
        return array, label


# --------------------------------------------------------------------------- loader


class StreamLoader:
    """One rank's training micro-batches from streamed shards, epoch by epoch.

    A `TrainBatches`, like `ddp.data.loaders.TrainLoader`. `valid` is all True: repeats
    are real training samples, counted in `repeats`. `indices` are the samples'
    indices in the split when a manifest describes the shards (`indexed`), else -1.
    After each epoch: `samples_read` (first-pass samples used), `repeats`, and
    `dropped` (samples of this rank's share left unread; None without a manifest,
    then the job-wide number is num_samples minus the sum of samples_read).
    """

    def __init__(self, dataset: _StreamDataset, options: LoaderOptions):
        self.dataset, self.plan = dataset, dataset.plan
        self.indexed = dataset.index is not None
        self.memory = None  # streamed shards are never held in memory
        self.num_skipped = 0
        """Bad samples skipped so far (on_error="skip"), summed over workers."""
        self.samples_read = 0
        self.repeats = 0
        self.dropped: int | None = None
        self._loader = micro_batch_loader(dataset, options, batch_size=None)

    def close(self) -> None:
        """Stop the DataLoader workers (persistent ones otherwise live with the loader)."""
        stop_workers(self._loader)

    def rank_samples(self, epoch: int) -> int | None:
        """Samples in this rank's share of the epoch (None without a manifest)."""
        if self.dataset.index is None:
            return None
        counts = self.dataset.index.counts
        return sum(
            self.dataset.share(epoch, k).num_samples(counts) for k in range(self.dataset.workers)
        )

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Exactly (iterations_per_epoch - start_step) * accumulate micro-batches."""
        plan = self.plan
        check_start_step(plan, start_step)
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be >= 0")
        self.dataset.set_epoch(epoch, start_step)
        self.samples_read = self.repeats = 0
        self.dropped = None
        following = start_step * plan.accumulate
        waiting: dict[int, Batch] = {}
        for item in self._loader:
            if item.error is not None:
                stop_workers(self._loader)
                raise (Interrupted if item.interrupted else DataError)(item.error)
            self.samples_read += item.fresh
            self.repeats += item.repeats
            waiting[item.position] = item.batch
            # Workers take turns, but one may run ahead: hand batches out in order.
            while following in waiting:
                batch = waiting.pop(following)
                following += 1
                self.num_skipped += batch.num_skipped
                if following == plan.micro_batches_per_epoch:
                    # The trainer stops asking after the last batch: count before it.
                    self._count_dropped(epoch)
                yield batch
        if following != plan.micro_batches_per_epoch or waiting:
            raise RuntimeError(
                f"streaming: {following} of {plan.micro_batches_per_epoch} micro-batches "
                "came back (a worker stopped early)"
            )
        self._count_dropped(epoch)

    def _count_dropped(self, epoch: int) -> None:
        share = self.rank_samples(epoch)
        if share is not None:
            self.dropped = max(0, share - self.samples_read)


def build_stream_loader(
    urls: list[str] | str | StreamShards,
    plan: BatchPlan,
    rank: int,
    seed: int,
    options: LoaderOptions | None = None,
    shuffle_buffer: int = 1000,
    transform: Transform | None = None,
    manifest_dir: str | os.PathLike | None = None,
) -> StreamLoader:
    """A StreamLoader over `urls` (a list, a brace pattern for webdataset, or the
    `StreamShards` the trainer opened already).

    Local shards (plain paths, file:// URLs) are checked now: a missing one raises
    DataError naming it. A manifest beside local shards (or in `manifest_dir`, for
    remote shards with a local copy of it) gives sample indices, checks the plan's
    num_samples and makes `dropped` exact; without one, plan.num_samples is taken
    as declared.
    """
    options = options or LoaderOptions()
    if not 0 <= rank < plan.world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={plan.world_size})")
    if shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer={shuffle_buffer} must be >= 0")
    shards = urls if isinstance(urls, StreamShards) else open_stream(urls, manifest_dir)
    index = shards.index
    if index is not None and sum(index.counts) != plan.num_samples:
        raise DataError(
            f"{index.manifest_path}: the plan is for {plan.num_samples:,} samples but the "
            f"streamed shards hold {sum(index.counts):,}"
        )
    dataset = _StreamDataset(
        shards.urls, index, plan, rank, seed, options, shuffle_buffer, transform
    )
    return StreamLoader(dataset, options)
