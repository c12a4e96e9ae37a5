"""Random access into tar shards: a micro-batch is read by manifest offsets.

Each process maps every shard it touches once (mmap) and slices members out of the
map; a micro-batch of same-header npy members is decoded with one header parse and
one gather (`ddp.data.samples`), not one `np.load` per sample.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from ddp.data.batch import Batch, Transform, make_batch
from ddp.data.samples import (
    check_shape,
    decode_input,
    decode_target,
    describe,
    gather_npy,
    parse_labels,
)
from ddp.order import MicroBatch
from ddp.shards.decode import LABEL_EXTS
from ddp.shards.manifest import DataError, Manifest, SplitIndex, read_manifest
from ddp.shards.tar import member_name


class ShardDataset(Dataset):
    """Map-style dataset over one split directory, read by manifest offsets.

    `__getitems__` takes a whole `MicroBatch` (or a list of indices) and returns a
    `Batch`. Shards are checked cheaply at construction (present, size as in the
    manifest, first and last member headers naming the manifest's keys) and mapped
    lazily, once per process; checksums are `ddp-shards verify`'s job.
    """

    def __init__(
        self,
        split_dir: str | os.PathLike,
        input_key: str = "npy",
        target_key: str = "cls",
        transform: Transform | None = None,
        on_error: Literal["raise", "skip"] = "raise",
        manifest: Manifest | None = None,
        num_classes: int | None = None,
    ):
        self.split_dir = Path(split_dir)
        manifest = manifest if manifest is not None else read_manifest(self.split_dir)
        self.index = SplitIndex.from_manifest(manifest)
        self.input_key, self.target_key = input_key, target_key
        self.transform = transform
        self.on_error = on_error
        self.num_classes = num_classes
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
        samples = self.index.shard_range(shard_id)
        offsets = self.index.offsets[self.input_key]
        ends = (samples[0], samples[-1]) if samples else ()
        checked = [i for i in ends if offsets[i] >= 512]
        if not checked:
            return
        with open(path, "rb") as f:
            for index in checked:
                offset = int(offsets[index])
                found = member_name(os.pread(f.fileno(), 512, offset - 512))
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
        return self._buffer(int(self.index.shard_of(index)))[offset : offset + size]

    def _members(self, indices: np.ndarray, ext: str) -> list[memoryview] | None:
        """Views of one member per sample (None if some sample lacks it): slicing
        memoryviews of the maps is the cheapest per-sample step there is."""
        offsets = self.index.offsets[ext][indices]
        if len(indices) == 0 or offsets.min() < 0:
            return None
        ends = (offsets + self.index.sizes[ext][indices]).tolist()
        shards = self.index.shard_of(indices).tolist()
        buffers = {shard: self._buffer(shard) for shard in set(shards)}
        return [buffers[s][o:e] for s, o, e in zip(shards, offsets.tolist(), ends, strict=True)]

    def _error(self, index: int, message: str) -> DataError:
        path = self._shard_path(int(self.index.shard_of(index)))
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
        return make_batch(inputs, targets, ok & ~padded, indices, int((~ok).sum()), self.transform)

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
            members = self._members(indices, self.target_key)
            fast = parse_labels(members, len(indices)) if members is not None else None
            if fast is not None and self._in_range(fast):
                return fast, ok
        targets = np.zeros(len(indices), dtype=np.int64)
        for i, index in enumerate(indices):
            try:
                raw = self.raw(index, self.target_key)
                targets[i] = decode_target(self.target_key, raw, self.num_classes)
            except Exception as err:  # noqa: BLE001 - any decode failure is bad data
                self._fail(int(index), f"undecodable .{self.target_key}: {describe(err)}")
                ok[i] = False
        return targets, ok

    def _in_range(self, labels: np.ndarray) -> bool:
        n = self.num_classes
        return n is None or len(labels) == 0 or (labels.min() >= 0 and labels.max() < n)

    def _decode_inputs(self, indices: np.ndarray) -> tuple[np.ndarray | list, np.ndarray]:
        if self.input_key == "npy":
            members = self._members(indices, "npy")
            fast = gather_npy(members) if members is not None else None
            if fast is not None:
                return fast, np.ones(len(indices), dtype=bool)
        arrays: list[np.ndarray | None] = []
        ok = np.ones(len(indices), dtype=bool)
        for i, index in enumerate(indices):
            try:
                array = decode_input(self.input_key, self.raw(index, self.input_key))
                first = next((a for a in arrays if a is not None), None)
                arrays.append(check_shape(array, first))
            except Exception as err:  # noqa: BLE001 - any decode failure is bad data
                self._fail(int(index), f"undecodable .{self.input_key}: {describe(err)}")
                arrays.append(None)
                ok[i] = False
        return arrays, ok

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
                    self._template = decode_input(self.input_key, self.raw(index, self.input_key))
                    break
                except Exception:  # noqa: BLE001, S112 - looking for any decodable sample
                    continue
            else:
                raise DataError(f"{self.split_dir}: no decodable .{self.input_key} sample at all")
        return self._template
