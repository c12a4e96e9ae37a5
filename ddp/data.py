"""The loader: micro-batches of samples read by manifest offsets from tar shards.

The order comes from `ddp.order` and is decided in the main process: a batch
sampler yields whole `MicroBatch`es, DataLoader workers only fetch them by index.
So the samples a rank sees depend on (plan, seed, epoch, rank, start_step) and on
nothing else: not on num_workers, not on persistent workers, not on timing.

Reading is random access: each worker maps every shard it touches once (mmap),
and a micro-batch of same-header npy members is decoded with one header parse
and a gather of payload slices, not one `np.load` per sample.
"""

from __future__ import annotations

import ast
import functools
import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ddp.order import MicroBatch, eval_micro_batches, rank_micro_batches
from ddp.plan import BatchPlan
from ddp.shards.decode import LABEL_EXTS, decode_member
from ddp.shards.manifest import DataError, SplitIndex, read_manifest

__all__ = [
    "Batch",
    "DataError",
    "EvalLoader",
    "LoaderOptions",
    "MemorySplit",
    "ShardDataset",
    "TrainLoader",
    "build_eval_loader",
    "build_train_loader",
    "num_samples",
]

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Batch:
    """One micro-batch, ready for the model."""

    inputs: torch.Tensor
    """float32, (B, ...): images as CHW in [0, 1], arrays as stored."""
    targets: torch.Tensor
    """int64 class labels, (B,)."""
    valid: torch.Tensor
    """bool (B,): False for padding repeats and skipped bad samples; metrics drop these."""
    indices: torch.Tensor
    """int64 (B,): the samples' indices in the split (manifest order)."""
    num_skipped: int = 0
    """Bad samples replaced in this batch (on_error="skip")."""

    def __len__(self) -> int:
        return len(self.targets)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()})

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        if self.inputs.device == torch.device(device):
            return self
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self, device: Any = None) -> Batch:
        """Called by DataLoader's pin-memory thread (pin_memory=True)."""
        return self._map(lambda t: t.pin_memory())


@dataclass
class LoaderOptions:
    """How to load; the trainer maps its config onto these fields."""

    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = True
    """Keep workers (and their open shards) between epochs; ignored with 0 workers."""
    prefetch_factor: int = 2
    on_error: Literal["raise", "skip"] = "raise"
    """raise: stop with a DataError. skip: mark the sample valid=False and count it."""
    input_key: str = "npy"
    """Member extension holding the input (npy, png, jpg, ...)."""
    target_key: str = "cls"
    """Member extension holding the integer label."""
    in_memory_max_mb: float = 256.0
    """Decode a split once and keep it in this process when its decoded inputs take at
    most this many MiB (0: always read the shards). Micro-batches are then gathers from
    memory in the training process; the shards and DataLoader workers are left alone.
    Not with a transform and num_workers > 0: augmentation stays in the workers."""

    def __post_init__(self) -> None:
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error={self.on_error!r} must be 'raise' or 'skip'")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers} must be >= 0")
        if self.prefetch_factor < 1:
            raise ValueError(f"prefetch_factor={self.prefetch_factor} must be >= 1")
        if self.in_memory_max_mb < 0:
            raise ValueError(f"in_memory_max_mb={self.in_memory_max_mb} must be >= 0")


def num_samples(split_dir: str | os.PathLike) -> int:
    """N of a split, from its manifest: what the plan needs before any data is read."""
    return read_manifest(split_dir).num_samples


class ShardDataset(Dataset):
    """Map-style dataset over one split directory, read by manifest offsets.

    `__getitems__` takes a whole `MicroBatch` (or a list of indices) and returns
    a `Batch`. Shards are checked cheaply at construction (present, size as in
    the manifest, first and last member headers naming the manifest's keys) and
    mapped lazily, once per process; checksums are `ddp-shards verify`'s job.
    """

    def __init__(
        self,
        split_dir: str | os.PathLike,
        input_key: str = "npy",
        target_key: str = "cls",
        transform: Transform | None = None,
        on_error: Literal["raise", "skip"] = "raise",
    ):
        self.split_dir = Path(split_dir)
        self.index = SplitIndex.from_manifest(read_manifest(self.split_dir))
        self.input_key, self.target_key = input_key, target_key
        self.transform = transform
        self.on_error = on_error
        self.num_errors = 0
        """Bad samples met in this process (workers keep their own; see Batch.num_skipped)."""
        self._buffers: dict[int, memoryview] = {}
        self._pid = os.getpid()
        self._template: np.ndarray | None = None
        self._check_columns()
        for shard_id in range(len(self.index.shard_names)):
            self._check_size(shard_id, self._shard_path(shard_id))
            self._check_headers(shard_id, self._shard_path(shard_id))

    # -- shards ---------------------------------------------------------------

    def _shard_path(self, shard_id: int) -> Path:
        return self.split_dir / self.index.shard_names[shard_id]

    def _check_columns(self) -> None:
        for key in (self.input_key, self.target_key):
            if key not in self.index.offsets:
                found = ", ".join(self.index.offsets) or "none"
                raise DataError(
                    f"{self.split_dir}: no sample has a .{key} member (extensions: {found})"
                )

    def _check_size(self, shard_id: int, path: Path, size: int | None = None) -> None:
        expected = self.index.shard_sizes[shard_id]
        if size is None:
            if not path.is_file():
                raise DataError(f"{path}: shard missing (listed in {self.split_dir}/manifest.json)")
            size = path.stat().st_size
        if size != expected:
            raise DataError(
                f"{path}: {size:,} bytes but the manifest says {expected:,} (truncated, or "
                f"rewritten without `ddp-shards index {self.split_dir}`)"
            )

    def _buffer(self, shard_id: int) -> memoryview:
        """The shard's bytes, mapped once per process (a forked worker maps its own)."""
        if self._pid != os.getpid():
            self._buffers, self._pid = {}, os.getpid()
        buffer = self._buffers.get(shard_id)
        if buffer is None:
            path = self._shard_path(shard_id)
            try:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    self._check_size(shard_id, path, size)
                    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            except FileNotFoundError as err:
                raise DataError(f"{path}: shard missing") from err
            buffer = self._buffers[shard_id] = memoryview(mapped)
        return buffer

    def _check_headers(self, shard_id: int, path: Path) -> None:
        """The tar headers of the shard's first and last samples name the keys the
        manifest says: catches a shard replaced by another of the same size."""
        samples = np.flatnonzero(self.index.shard_of == shard_id)
        offsets = self.index.offsets[self.input_key]
        checked = [int(i) for i in samples[[0, -1]] if offsets[i] >= 512] if len(samples) else []
        if not checked:
            return
        with open(path, "rb") as f:
            for index in checked:
                offset = int(offsets[index])
                found = _tar_member_name(os.pread(f.fileno(), 512, offset - 512))
                expected = f"{self.index.keys[index]}.{self.input_key}"
                if found != expected and not (len(found) >= 99 and expected.startswith(found)):
                    raise DataError(
                        f"{path}: the member at byte {offset:,} is {found!r} but the manifest "
                        f"says {expected!r} (re-run `ddp-shards index {self.split_dir}`)"
                    )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_buffers"] = {}
        return state

    def raw(self, index: int, ext: str) -> memoryview:
        """The bytes of one member (a view into the mapped shard); LookupError if absent."""
        offset = int(self.index.offsets[ext][index])
        if offset < 0:
            raise LookupError(f"the sample has no .{ext} member")
        size = int(self.index.sizes[ext][index])
        return self._buffer(int(self.index.shard_of[index]))[offset : offset + size]

    def _members(self, indices: np.ndarray, ext: str) -> list[memoryview] | None:
        """Views of one member per sample (None if some sample lacks it): slicing
        memoryviews of the maps is the cheapest per-sample step there is."""
        offsets = self.index.offsets[ext][indices]
        if len(indices) == 0 or offsets.min() < 0:
            return None
        ends = (offsets + self.index.sizes[ext][indices]).tolist()
        shards = self.index.shard_of[indices].tolist()
        buffers = {shard: self._buffer(shard) for shard in set(shards)}
        return [buffers[s][o:e] for s, o, e in zip(shards, offsets.tolist(), ends, strict=True)]

    def _error(self, index: int, message: str) -> DataError:
        path = self._shard_path(int(self.index.shard_of[index]))
        return DataError(f"{path}: key {self.index.keys[index]}: {message}")

    # -- samples ----------------------------------------------------------------

    def __len__(self) -> int:
        return self.index.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        batch = self.__getitems__([index])
        return batch.inputs[0], int(batch.targets[0])

    def __getitems__(self, refs: MicroBatch | Sequence[int]) -> Batch:
        if isinstance(refs, MicroBatch):
            return self.fetch(refs.indices, refs.padded)
        indices = np.asarray(refs, dtype=np.int64)
        return self.fetch(indices, np.zeros(len(indices), dtype=bool))

    def fetch(self, indices: np.ndarray, padded: np.ndarray) -> Batch:
        """Read and decode one micro-batch (padded samples come out valid=False)."""
        inputs, targets, ok = self.decode(indices)
        tensor = _as_input_tensor(inputs)
        if self.transform is not None:
            tensor = torch.stack([self.transform(x) for x in tensor])
        return Batch(
            inputs=tensor,
            targets=torch.from_numpy(targets),
            valid=torch.from_numpy(ok & ~padded),
            indices=torch.from_numpy(np.array(indices, dtype=np.int64)),
            num_skipped=int((~ok).sum()),
        )

    def decode(self, indices: np.ndarray) -> tuple[np.ndarray | list, np.ndarray, np.ndarray]:
        """Inputs as stored (e.g. uint8 HWC), labels, and which samples were good; bad
        ones (on_error="skip") come back as zeros, labelled 0."""
        inputs, input_ok = self._decode_inputs(indices)
        targets, target_ok = self._decode_targets(indices)
        ok = input_ok & target_ok
        if not ok.all():
            self.num_errors += int((~ok).sum())
            inputs, targets = self._replace_bad(inputs, targets, ok)
        return inputs, targets, ok

    def _fail(self, index: int, message: str) -> None:
        """Raise, or (on_error="skip") let the caller mark the sample invalid."""
        if self.on_error == "raise":
            raise self._error(index, message)

    def _decode_targets(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ok = np.ones(len(indices), dtype=bool)
        if self.target_key in LABEL_EXTS:
            fast = _parse_labels(self._members(indices, self.target_key), len(indices))
            if fast is not None:
                return fast, ok
        targets = np.zeros(len(indices), dtype=np.int64)
        for i, index in enumerate(indices):
            try:
                targets[i] = int(
                    decode_member(self.target_key, bytes(self.raw(index, self.target_key)))
                )
            except Exception as err:  # noqa: BLE001 - any decode failure is bad data
                self._fail(int(index), f"undecodable .{self.target_key}: {_reason(err)}")
                ok[i] = False
        return targets, ok

    def _decode_inputs(self, indices: np.ndarray) -> tuple[np.ndarray | list, np.ndarray]:
        if self.input_key == "npy":
            fast = self._gather_npy(indices)
            if fast is not None:
                return fast, np.ones(len(indices), dtype=bool)
        arrays: list[np.ndarray | None] = []
        ok = np.ones(len(indices), dtype=bool)
        for i, index in enumerate(indices):
            try:
                array = decode_member(self.input_key, bytes(self.raw(index, self.input_key)))
                arrays.append(_check_shape(np.asarray(array), arrays))
            except Exception as err:  # noqa: BLE001 - any decode failure is bad data
                self._fail(int(index), f"undecodable .{self.input_key}: {_reason(err)}")
                arrays.append(None)
                ok[i] = False
        return arrays, ok

    def _gather_npy(self, indices: np.ndarray) -> np.ndarray | None:
        """All members share the first one's npy header: parse it once and join the
        members in one C-level copy. None sends the batch to the per-sample path."""
        members = self._members(indices, "npy")
        if members is None or len({len(m) for m in members}) != 1:
            return None
        header = _npy_header(members[0])
        if header is None:
            return None
        head, dtype, shape = header
        size = len(members[0])
        if len(head) + dtype.itemsize * int(np.prod(shape)) != size:
            return None
        joined = np.frombuffer(b"".join(members), dtype=np.uint8).reshape(len(members), size)
        if not (joined[:, : len(head)] == np.frombuffer(head, dtype=np.uint8)).all():
            return None
        payload = np.empty((len(members), size - len(head)), dtype=np.uint8)
        payload[:] = joined[:, len(head) :]
        return payload.view(dtype).reshape(len(members), *shape)

    def _replace_bad(
        self, inputs: np.ndarray | list, targets: np.ndarray, ok: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Fill skipped samples with zeros shaped like a good one, so shapes and batch
        counts stay the same on every rank."""
        template = next(
            (a for a, good in zip(inputs, ok, strict=True) if good and a is not None), None
        )
        if template is None:
            template = self._find_template()
        zeros = np.zeros_like(template)
        filled = [
            a if good and a is not None else zeros for a, good in zip(inputs, ok, strict=True)
        ]
        targets = np.where(ok, targets, 0)
        return np.stack(filled), targets

    def _find_template(self) -> np.ndarray:
        if self._template is None:
            for index in range(len(self)):
                try:
                    raw = bytes(self.raw(index, self.input_key))
                    self._template = np.asarray(decode_member(self.input_key, raw))
                    break
                except Exception:  # noqa: BLE001, S112 - looking for any decodable sample
                    continue
            else:
                raise DataError(f"{self.split_dir}: no decodable .{self.input_key} sample at all")
        return self._template


def _tar_member_name(header: bytes) -> str:
    """Member name from a 512-byte ustar header (prefix + name fields)."""
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
    return (prefix + b"/" + name if prefix else name).decode("utf-8", "replace")


def _reason(err: Exception) -> str:
    return str(err) if type(err) is LookupError else f"{type(err).__name__}: {err}"


def _check_shape(array: np.ndarray, previous: list[np.ndarray | None]) -> np.ndarray:
    first = next((a for a in previous if a is not None), None)
    if first is not None and (first.shape != array.shape):
        raise ValueError(f"shape {array.shape} differs from the batch's {first.shape}")
    return array


def _npy_header(member: memoryview) -> tuple[bytes, np.dtype, tuple[int, ...]] | None:
    """(header bytes, dtype, shape) of a plain C-order npy member, else None."""
    start = bytes(member[:12])
    if not start.startswith(b"\x93NUMPY") or len(start) < 12:
        return None
    if start[6] == 1:
        length = 10 + int.from_bytes(start[8:10], "little")
    elif start[6] in (2, 3):
        length = 12 + int.from_bytes(start[8:12], "little")
    else:
        return None
    return _parse_npy_header(bytes(member[:length])) if length <= len(member) else None


@functools.lru_cache(maxsize=64)
def _parse_npy_header(header: bytes) -> tuple[bytes, np.dtype, tuple[int, ...]] | None:
    """Cached: a split usually has one header for all its samples."""
    try:
        info = ast.literal_eval(header[10 if header[6] == 1 else 12 :].decode("latin1"))
        dtype = np.dtype(info["descr"])
        shape = tuple(int(d) for d in info["shape"])
    except (ValueError, SyntaxError, TypeError, KeyError):
        return None
    if info.get("fortran_order") or dtype.hasobject:
        return None
    return header, dtype, shape


def _parse_labels(members: list[memoryview] | None, count: int) -> np.ndarray | None:
    """Integer labels of a whole batch from one join and split; None (then the
    per-sample path names the culprit) unless every member is exactly one int."""
    if members is None:
        return None
    tokens = b" ".join(members).split()
    if len(tokens) != count:
        return None
    try:
        return np.array([int(t) for t in tokens], dtype=np.int64)
    except ValueError:
        return None


def _as_input_tensor(inputs: np.ndarray | list) -> torch.Tensor:
    """uint8 images (B,H,W,C) or (B,H,W) -> float32 (B,C,H,W) in [0,1]; others as float32."""
    array = inputs if isinstance(inputs, np.ndarray) else np.stack(inputs)
    if not array.flags.writeable:
        array = array.copy()
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.dtype != torch.uint8:
        return tensor.to(torch.float32)
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(-1)
    if tensor.dim() != 4:
        return tensor.to(torch.float32)
    # Transpose while the elements are 1 byte, then convert contiguously: about
    # twice as fast as one strided uint8 -> float32 copy.
    return tensor.permute(0, 3, 1, 2).contiguous().to(torch.float32).mul_(1.0 / 255.0)


class MemorySplit:
    """A whole split decoded once and kept in memory: a micro-batch is an index gather.

    Samples are kept as stored (uint8 images stay uint8: a quarter of float32) and go
    through the same conversion and transform as `ShardDataset.fetch`, per micro-batch,
    so order, masks and numbers do not depend on whether a split is held in memory; only
    the per-step reading goes. On the digits MLP that reading was a tenth of every step
    (bench/overhead.py). `load` declines a split with a bad or odd sample (another shape
    or dtype): the shard path judges those per micro-batch, and stays the reference.
    """

    def __init__(self, inputs: np.ndarray, targets: np.ndarray, transform, pin_memory: bool):
        self.inputs, self.targets = inputs, torch.from_numpy(targets)
        self.transform = transform
        self.pin_memory = pin_memory

    @classmethod
    def load(cls, dataset: ShardDataset, pin_memory: bool = False) -> MemorySplit | None:
        inputs, targets, ok = dataset.decode(np.arange(len(dataset)))
        if not ok.all():
            return None
        if not isinstance(inputs, np.ndarray):  # decoded one by one: all alike?
            if len({(a.shape, a.dtype) for a in inputs}) != 1:
                return None
            inputs = np.stack(inputs)
        return cls(inputs, targets, dataset.transform, pin_memory)

    @staticmethod
    def fits(dataset: ShardDataset, max_mb: float) -> bool:
        """Whether the split takes at most `max_mb` MiB as stored (judged by sample 0)."""
        if max_mb <= 0 or len(dataset) == 0:
            return False
        try:
            inputs, _, _ = dataset.decode(np.zeros(1, dtype=np.int64))
        except DataError:
            return False  # decided by the normal path, which reports or skips it
        return np.asarray(inputs[0]).nbytes * len(dataset) <= max_mb * (1 << 20)

    def fetch(self, micro: MicroBatch) -> Batch:
        inputs = _as_input_tensor(self.inputs[micro.indices])
        if self.transform is not None:
            inputs = torch.stack([self.transform(x) for x in inputs])
        indices = torch.from_numpy(np.asarray(micro.indices, dtype=np.int64))
        batch = Batch(
            inputs=inputs,
            targets=self.targets.index_select(0, indices),
            valid=torch.from_numpy(~np.asarray(micro.padded, dtype=bool)),
            indices=indices,
        )
        return batch.pin_memory() if self.pin_memory else batch


def _memory_split(
    dataset: ShardDataset, options: LoaderOptions, training: bool
) -> MemorySplit | None:
    if training and dataset.transform is not None and options.num_workers > 0:
        return None
    if not MemorySplit.fits(dataset, options.in_memory_max_mb):
        return None
    return MemorySplit.load(dataset, options.pin_memory)


@dataclass(frozen=True)
class _Failure:
    """A DataError carried from a worker to the main process as data, so it is
    raised there as one clean line instead of a worker traceback."""

    message: str


class _MicroBatchFetcher(Dataset):
    """What DataLoader workers see: fetch a whole MicroBatch, report bad data as a
    value."""

    def __init__(self, dataset: ShardDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, micro: MicroBatch) -> Batch | _Failure:
        try:
            return self.dataset.fetch(micro.indices, micro.padded)
        except DataError as err:
            return _Failure(str(err))


def _identity(batch: Batch | _Failure) -> Batch | _Failure:
    return batch


def _checked(loader: DataLoader) -> Iterator[Batch]:
    """Raise a worker's DataError in the main process, after stopping the workers
    (left to the garbage collector, their shutdown can stall for seconds)."""
    for batch in loader:
        if isinstance(batch, _Failure):
            _shutdown_workers(loader)
            raise DataError(batch.message)
        yield batch


def _shutdown_workers(loader: DataLoader) -> None:
    """Stop a DataLoader's (persistent) workers now; the next epoch starts new ones.
    DataLoader has no public call for this; Lightning resets `_iterator` the same way."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None


class EpochBatchSampler:
    """Yields this rank's MicroBatches for the epoch set last; lives in the main
    process, so `set_epoch` is seen even by persistent workers."""

    def __init__(self, plan: BatchPlan, seed: int, rank: int):
        self.plan, self.seed, self.rank = plan, seed, rank
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self) -> Iterator[MicroBatch]:
        return rank_micro_batches(self.plan, self.seed, self.epoch, self.rank, self.start_step)

    def __len__(self) -> int:
        return (self.plan.iterations_per_epoch - self.start_step) * self.plan.accumulate


def _data_loader(dataset: ShardDataset, batch_sampler: Any, options: LoaderOptions) -> DataLoader:
    return loader_for(_MicroBatchFetcher(dataset), options, batch_sampler=batch_sampler)


def loader_for(dataset: Any, options: LoaderOptions, **sampling: Any) -> DataLoader:
    """A DataLoader of whole micro-batches (exact or streaming), set up from `options`."""
    workers = options.num_workers
    return DataLoader(
        dataset,
        **sampling,
        collate_fn=_identity,
        num_workers=workers,
        pin_memory=options.pin_memory,
        persistent_workers=options.persistent_workers and workers > 0,
        prefetch_factor=options.prefetch_factor if workers > 0 else None,
        # Each iter() draws a base seed from this generator; from the global one it would
        # shift the training RNG (dropout) by one draw per epoch start, and a resume
        # mid-epoch (one more iter()) would no longer be bitwise equal.
        generator=torch.Generator().manual_seed(0),
    )


class TrainLoader:
    """One rank's training micro-batches, epoch by epoch, resumable at any step."""

    def __init__(
        self, dataset: ShardDataset, plan: BatchPlan, rank: int, seed: int, options: LoaderOptions
    ):
        if plan.num_samples != len(dataset):
            raise DataError(
                f"{dataset.split_dir}: the plan is for {plan.num_samples:,} samples but the "
                f"manifest lists {len(dataset):,}"
            )
        self.dataset, self.plan = dataset, plan
        self.sampler = EpochBatchSampler(plan, seed, rank)
        self.num_skipped = 0
        """Bad samples replaced so far (on_error="skip"), summed over workers."""
        self.memory = _memory_split(dataset, options, training=True)
        self._loader = None if self.memory else _data_loader(dataset, self.sampler, options)

    def close(self) -> None:
        """Stop the DataLoader workers (persistent ones otherwise live with the loader)."""
        if self._loader is not None:
            _shutdown_workers(self._loader)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Exactly (iterations_per_epoch - start_step) * accumulate micro-batches."""
        if not 0 <= start_step <= self.plan.iterations_per_epoch:
            raise ValueError(
                f"start_step={start_step} is outside the epoch's "
                f"{self.plan.iterations_per_epoch} iterations"
            )
        self.sampler.set_epoch(epoch, start_step)
        if self.memory is not None:
            batches = map(self.memory.fetch, self.sampler)
        else:
            batches = _checked(self._loader)
        for batch in batches:
            self.num_skipped += batch.num_skipped
            yield batch


class EvalLoader:
    """One rank's share of the validation set: same micro-batch count on all ranks."""

    def __init__(
        self, dataset: ShardDataset, micro_batches: list[MicroBatch], options: LoaderOptions
    ):
        self.dataset = dataset
        self.micro_batches = micro_batches
        self.num_skipped = 0
        self.memory = _memory_split(dataset, options, training=False)
        self._loader = None if self.memory else _data_loader(dataset, micro_batches, options)

    def __len__(self) -> int:
        return len(self.micro_batches)

    def close(self) -> None:
        """Stop the DataLoader workers (persistent ones otherwise live with the loader)."""
        if self._loader is not None:
            _shutdown_workers(self._loader)

    def __iter__(self) -> Iterator[Batch]:
        if self.memory is not None:
            batches = map(self.memory.fetch, self.micro_batches)
        else:
            batches = _checked(self._loader)
        for batch in batches:
            self.num_skipped += batch.num_skipped
            yield batch


def _dataset(
    split_dir: str | os.PathLike, options: LoaderOptions, transform: Transform | None
) -> ShardDataset:
    return ShardDataset(
        split_dir, options.input_key, options.target_key, transform, options.on_error
    )


def build_train_loader(
    split_dir: str | os.PathLike,
    plan: BatchPlan,
    rank: int,
    seed: int,
    options: LoaderOptions | None = None,
    transform: Transform | None = None,
) -> TrainLoader:
    options = options or LoaderOptions()
    return TrainLoader(_dataset(split_dir, options, transform), plan, rank, seed, options)


def build_eval_loader(
    split_dir: str | os.PathLike,
    micro_size: int,
    rank: int,
    world_size: int,
    options: LoaderOptions | None = None,
    transform: Transform | None = None,
) -> EvalLoader:
    options = options or LoaderOptions()
    dataset = _dataset(split_dir, options, transform)
    micro_batches = eval_micro_batches(len(dataset), micro_size, rank, world_size)
    return EvalLoader(dataset, micro_batches, options)
