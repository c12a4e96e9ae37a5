"""One rank's micro-batches, from a `ShardDataset` through a DataLoader, or from memory.

The order comes from `ddp.order` and is decided in the main process: a batch sampler
yields whole `MicroBatch`es, DataLoader workers only fetch them by index. So the samples
a rank sees depend on (plan, seed, epoch, rank, start_step) and on nothing else: not on
num_workers, not on persistent workers, not on timing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ddp.data.batch import Batch, LoaderOptions, Transform
from ddp.data.cache import RemoteSplit
from ddp.data.dataset import ShardDataset
from ddp.data.images import ImageAugment
from ddp.data.memory import MemorySplit
from ddp.data.prefetch import Prefetcher
from ddp.errors import DataError
from ddp.order import (
    MicroBatch,
    ShardWindows,
    check_start_step,
    eval_micro_batches,
    rank_micro_batches,
)
from ddp.plan import BatchPlan
from ddp.shards.manifest import Manifest


def micro_batch_loader(dataset: Any, options: LoaderOptions, **sampling: Any) -> DataLoader:
    """A DataLoader of whole micro-batches (exact or streaming), set up from `options`."""
    workers = options.loader.num_workers
    return DataLoader(
        dataset,
        **sampling,
        collate_fn=_as_is,
        num_workers=workers,
        pin_memory=options.pin_memory,
        persistent_workers=options.persistent_workers and workers > 0,
        prefetch_factor=options.loader.prefetch_factor if workers > 0 else None,
        # Each iter() draws a base seed from this generator; from the global one it would
        # shift the training RNG (dropout) by one draw per epoch start, and a resume
        # mid-epoch (one more iter()) would no longer be bitwise equal.
        generator=torch.Generator().manual_seed(0),
    )


def stop_workers(loader: DataLoader) -> None:
    """Stop a DataLoader's (persistent) workers now; the next epoch starts new ones.
    DataLoader has no public call for this; Lightning resets `_iterator` the same way."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None


@dataclass(frozen=True)
class WorkerFailure:
    """A DataError carried from a worker to the main process as data, so it is raised
    there as one clean line instead of a worker traceback."""

    message: str


def raise_failures(loader: DataLoader, items: Iterable[Any]) -> Iterator[Any]:
    """`items` (from `loader`), raising a worker's DataError in the main process after
    stopping the workers (left to the garbage collector, their shutdown can stall)."""
    for item in items:
        if isinstance(item, WorkerFailure):
            stop_workers(loader)
            raise DataError(item.message)
        yield item


def _as_is(item: Any) -> Any:
    return item


class _MicroBatchFetcher(Dataset):
    """What DataLoader workers see: fetch a whole MicroBatch, report bad data as a value."""

    def __init__(self, dataset: ShardDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, micro: MicroBatch) -> Batch | WorkerFailure:
        try:
            return self.dataset.fetch(micro.indices, micro.padded, micro.epoch)
        except DataError as err:
            return WorkerFailure(str(err))


class _Source:
    """Micro-batches by `MicroBatch`: gathered from memory when the split fits there
    (in this process), else fetched by DataLoader workers from the shards."""

    def __init__(
        self,
        dataset: ShardDataset,
        sampler: Iterable[MicroBatch],
        options: LoaderOptions,
        training: bool,
    ):
        self.memory = _memory_split(dataset, options, training)
        self.sampler = sampler
        self.num_skipped = 0
        """Bad samples replaced so far (on_error="skip"), summed over workers."""
        self.loader = (
            None
            if self.memory
            else micro_batch_loader(_MicroBatchFetcher(dataset), options, batch_sampler=sampler)
        )

    def __iter__(self) -> Iterator[Batch]:
        if self.memory is not None:
            batches = map(self.memory.fetch, self.sampler)
        else:
            batches = raise_failures(self.loader, self.loader)
        for batch in batches:
            self.num_skipped += batch.num_skipped
            yield batch

    def close(self) -> None:
        if self.loader is not None:
            stop_workers(self.loader)


def _memory_split(
    dataset: ShardDataset, options: LoaderOptions, training: bool
) -> MemorySplit | None:
    if training and dataset.transform is not None and options.loader.num_workers > 0:
        return None
    if dataset.images is not None:  # decoded (and augmented) per micro-batch, per epoch
        return None
    if not MemorySplit.fits(dataset, options.loader.in_memory_max_mb):
        return None
    on_device = options.memory_device if dataset.transform is None else None  # transforms: host
    return MemorySplit.load(dataset, options.pin_memory, on_device)


class EpochBatchSampler:
    """Yields this rank's MicroBatches for the epoch set last; lives in the main
    process, so `set_epoch` is seen even by persistent workers."""

    def __init__(self, plan: BatchPlan, seed: int, rank: int, windows: ShardWindows | None = None):
        self.plan, self.seed, self.rank, self.windows = plan, seed, rank, windows
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self) -> Iterator[MicroBatch]:
        return rank_micro_batches(
            self.plan, self.seed, self.epoch, self.rank, self.start_step, self.windows
        )

    def __len__(self) -> int:
        return (self.plan.iterations_per_epoch - self.start_step) * self.plan.accumulate


class TrainLoader:
    """One rank's training micro-batches, epoch by epoch, resumable at any step
    (a `TrainBatches`)."""

    indexed = True

    def __init__(
        self, dataset: ShardDataset, plan: BatchPlan, rank: int, seed: int, options: LoaderOptions
    ):
        if plan.num_samples != len(dataset):
            raise DataError(
                f"{dataset.split_dir}: the plan is for {plan.num_samples:,} samples but the "
                f"manifest lists {len(dataset):,}"
            )
        self.dataset, self.plan = dataset, plan
        windows = ShardWindows.of(dataset.index.table.counts, options.window_shards)
        self.sampler = EpochBatchSampler(plan, seed, rank, windows)
        self._source = _Source(dataset, self.sampler, options, training=True)
        self.memory = self._source.memory

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Exactly (iterations_per_epoch - start_step) * accumulate micro-batches."""
        check_start_step(self.plan, start_step)
        self.sampler.set_epoch(epoch, start_step)
        remote = self.dataset.remote
        if remote is None or self.memory is not None:
            return iter(self._source)
        return self._prefetching(remote)

    def _prefetching(self, remote: RemoteSplit) -> Iterator[Batch]:
        """The epoch's batches while a thread fetches the shards they need next."""
        dataset = self.dataset
        prefetcher = Prefetcher(
            remote,
            dataset.index.shard_of,
            iter(self.sampler),
            remote.prefetch_shards,
            dataset.holds,
        ).start()
        try:
            for done, batch in enumerate(self._source, start=1):
                yield batch
                prefetcher.consumed(done)
        finally:
            prefetcher.stop()

    @property
    def num_skipped(self) -> int:
        """Bad samples replaced so far (on_error="skip"), summed over workers."""
        return self._source.num_skipped

    def close(self) -> None:
        self._source.close()


class EvalLoader:
    """One rank's share of the validation set: same micro-batch count on all ranks."""

    def __init__(
        self, dataset: ShardDataset, micro_batches: list[MicroBatch], options: LoaderOptions
    ):
        self.dataset = dataset
        self.micro_batches = micro_batches
        self._source = _Source(dataset, micro_batches, options, training=False)
        self.memory = self._source.memory

    def __len__(self) -> int:
        return len(self.micro_batches)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self._source)

    @property
    def num_skipped(self) -> int:
        return self._source.num_skipped

    def close(self) -> None:
        self._source.close()


def open_dataset(
    split_dir: str | os.PathLike,
    options: LoaderOptions,
    transform: Transform | None = None,
    manifest: Manifest | None = None,
    images: ImageAugment | None = None,
    remote: RemoteSplit | None = None,
) -> ShardDataset:
    return ShardDataset(
        split_dir,
        options.input_key,
        options.target_key,
        transform,
        options.loader.on_error,
        manifest,
        options.num_classes,
        options.classes,
        images,
        remote,
    )


def build_train_loader(
    split_dir: str | os.PathLike,
    plan: BatchPlan,
    rank: int,
    seed: int,
    options: LoaderOptions | None = None,
    transform: Transform | None = None,
    manifest: Manifest | None = None,
    images: ImageAugment | None = None,
    remote: RemoteSplit | None = None,
) -> TrainLoader:
    options = options or LoaderOptions()
    dataset = open_dataset(split_dir, options, transform, manifest, images, remote)
    return TrainLoader(dataset, plan, rank, seed, options)


def build_eval_loader(
    split_dir: str | os.PathLike,
    micro_size: int,
    rank: int,
    world_size: int,
    options: LoaderOptions | None = None,
    manifest: Manifest | None = None,
    transform: Transform | None = None,
    images: ImageAugment | None = None,
    remote: RemoteSplit | None = None,
) -> EvalLoader:
    options = options or LoaderOptions()
    dataset = open_dataset(split_dir, options, transform, manifest, images, remote)
    micro_batches = eval_micro_batches(len(dataset), micro_size, rank, world_size)
    return EvalLoader(dataset, micro_batches, options)
