"""Random access into tar shards: a micro-batch is read by manifest offsets.

Each process maps every shard it touches once (mmap) and slices members out of the
map; a micro-batch of same-header npy members is decoded with one header parse and
one gather (`ddp.data.samples`), not one `np.load` per sample.

A remote split (`ddp.data.cache`) is read the same way: each shard is fetched whole into
the local cache (verified against its sha256) when first mapped, and pinned there while
mapped; a process keeps at most `RemoteSplit.max_pinned` remote shards mapped.
"""

from __future__ import annotations

import mmap
import os
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from ddp.data.batch import Batch, Transform, make_batch
from ddp.data.images import ImageAugment
from ddp.data.samples import (
    LabelKey,
    alternatives,
    decode_input,
    describe,
    gather_npy,
    parse_labels,
)
from ddp.errors import DataError
from ddp.order import MicroBatch
from ddp.shards.columns import NO_LABEL
from ddp.shards.decode import LABEL_EXTS
from ddp.shards.manifest import Manifest, SplitIndex, read_manifest
from ddp.shards.tar import member_name

if TYPE_CHECKING:
    from ddp.data.cache import RemoteSplit

CHECK_CHUNK = 1 << 20
"""Samples whose member columns are read at once when checking a split at start-up."""


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
        classes: Sequence[str] | None = None,
        images: ImageAugment | None = None,
        remote: RemoteSplit | None = None,
    ):
        self.split_dir = Path(split_dir)
        self.remote = remote
        """Where the shards come from when they live elsewhere (None: split_dir)."""
        self._pins: dict[int, int] = {}
        manifest = manifest if manifest is not None else read_manifest(self.split_dir)
        self.index = SplitIndex.from_manifest(manifest)
        self.input_key, self.target_key = input_key, target_key
        self.input_exts = alternatives(input_key)
        """Member extensions that may hold the input, first present wins (`jpg;png`)."""
        self.label_key = LabelKey.parse(target_key, classes or manifest.meta.get("classes"))
        self.transform = transform
        self.on_error = on_error
        self.num_classes = num_classes
        self.images = images
        """Decodes and augments image inputs (data.augment); None: decoded as stored."""
        self.num_errors = 0
        """Bad samples met in this process (workers keep their own; see Batch.num_skipped)."""
        self._buffers: OrderedDict[int, memoryview] = OrderedDict()
        """Mapped shards, least recently used first (remote ones are unmapped in turn)."""
        self._checked: set[int] = set()
        """Remote shards whose tar headers this process checked (on their first map)."""
        self._pid = os.getpid()
        self._template: np.ndarray | None = None
        self._check_columns()
        if remote is not None:
            return  # each shard is checked as it arrives (sha256, then its headers)
        for shard_id in range(len(self.index.shard_names)):
            self._check_size(shard_id, self._shard_path(shard_id))
            self._check_headers(shard_id, self._shard_path(shard_id))

    # -- shards ---------------------------------------------------------------

    def _shard_path(self, shard_id: int) -> Path:
        return self.split_dir / self.index.shard_names[shard_id]

    def _shard_label(self, shard_id: int) -> str:
        """How messages name a shard: its URL when remote, else its path."""
        if self.remote is not None:
            return self.remote.shard_url(shard_id)
        return str(self._shard_path(shard_id))

    def _check_columns(self) -> None:
        """Every sample has an input member and a label member (of one of the extensions
        named): found now, naming the first sample without, not mid-epoch. The manifest's
        per-shard member counts vouch for whole shards; only the others' columns are read,
        a bounded chunk at a time."""
        for key, exts in (
            (self.input_key, self.input_exts),
            (self.target_key, self.label_key.exts),
        ):
            for samples in self._unvouched(exts):
                _, _, present = self._choose(samples, exts)
                if not present.all():
                    first = int(samples[np.flatnonzero(~present)[0]])
                    found = ", ".join(self.index.offsets) or "none"
                    raise DataError(
                        f"{self._shard_path(int(self.index.shard_of(first)))}: key "
                        f"{self.index.keys[first]} has no .{' or .'.join(exts)} member (data: "
                        f"{key!r}; the split's extensions: {found})"
                    )

    def _unvouched(self, exts: Sequence[str]) -> Iterator[np.ndarray]:
        """The samples, in chunks of at most CHECK_CHUNK, of the shards whose member counts
        do not show a member of one of `exts` in every sample (all of them without counts)."""
        table = self.index.table
        covered = table.covered(exts)
        if covered is None:
            covered = np.zeros(len(table), dtype=bool)
        # Runs of unvouched shards: where `covered` turns False, and back to True.
        edges = np.flatnonzero(np.diff(np.concatenate([[True], covered, [True]]).astype(np.int8)))
        for first, stop in edges.reshape(-1, 2).tolist():
            lo, hi = int(table.starts[first]), int(table.starts[stop])
            for start in range(lo, hi, CHECK_CHUNK):
                yield np.arange(start, min(hi, start + CHECK_CHUNK), dtype=np.int64)

    def _choose(
        self, indices: np.ndarray, exts: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per sample: which of `exts` holds the member (the first present), its offset,
        and whether there is one at all."""
        missing = np.full(len(indices), -1, dtype=np.int64)
        offsets = np.stack([self.index.offsets.get(ext, missing)[indices] for ext in exts])
        present = offsets >= 0
        which = present.argmax(axis=0)
        return which, offsets[which, np.arange(len(indices))], present.any(axis=0)

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
            self._forget_inherited()
        if self.remote is not None:
            return self._remote_buffer(shard_id)
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

    def _forget_inherited(self) -> None:
        """In a forked worker: map afresh (the pins inherited from the parent were closed
        at the fork, see ddp.data.cache)."""
        self._buffers, self._pins, self._pid = OrderedDict(), {}, os.getpid()

    def _remote_buffer(self, shard_id: int) -> memoryview:
        """A remote shard's bytes: fetched into the cache, pinned and mapped on first use;
        the least recently used beyond `max_pinned` are unmapped and unpinned."""
        buffer = self._buffers.get(shard_id)
        if buffer is not None:
            self._buffers.move_to_end(shard_id)  # now the most recently used
            return buffer
        assert self.remote is not None
        pin = self.remote.pin(shard_id)
        try:
            path = self._shard_path(shard_id)
            with open(path, "rb") as f:
                self._check_size(shard_id, path, os.fstat(f.fileno()).st_size)
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            if shard_id not in self._checked:  # as a local split's are, once a process
                self._check_headers(shard_id, path, mapped)
                self._checked.add(shard_id)
        except BaseException:
            self.remote.unpin(pin)
            raise
        while len(self._buffers) >= self.remote.max_pinned:
            oldest, _ = self._buffers.popitem(last=False)  # unmapped when its last view goes
            self.remote.unpin(self._pins.pop(oldest))
        self._buffers[shard_id], self._pins[shard_id] = memoryview(mapped), pin
        return self._buffers[shard_id]

    def holds(self, shard_id: int) -> bool:
        """This process has the (remote) shard pinned in the cache: it stays until let go.
        Safe from another thread (one dict lookup)."""
        return shard_id in self._pins

    def _check_headers(self, shard_id: int, path: Path, mapped: mmap.mmap | None = None) -> None:
        """The tar headers of the shard's first and last samples name the keys the
        manifest says: catches a shard replaced by another of the same size. Read from
        `mapped` when the shard is mapped already, else from `path`."""
        samples = self.index.shard_range(shard_id)
        if not samples:
            return
        ends = np.array([samples[0], samples[-1]], dtype=np.int64)
        which, offsets, _ = self._choose(ends, self.input_exts)
        members = zip(ends.tolist(), which.tolist(), offsets.tolist(), strict=True)
        checked = [(index, ext, offset) for index, ext, offset in members if offset >= 512]
        if mapped is None:
            with open(path, "rb") as f:
                headers = [os.pread(f.fileno(), 512, offset - 512) for _, _, offset in checked]
        else:
            headers = [mapped[offset - 512 : offset] for _, _, offset in checked]
        for (index, ext, offset), header in zip(checked, headers, strict=True):
            found = member_name(header)
            expected = f"{self.index.keys[index]}.{self.input_exts[ext]}"
            if found != expected and not (len(found) >= 99 and expected.startswith(found)):
                raise DataError(
                    f"{path}: the member at byte {offset:,} is {found!r} but the manifest "
                    f"says {expected!r} (re-run `ddp-shards index {self.split_dir}`)"
                )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_buffers"], state["_pins"] = OrderedDict(), {}
        return state

    def raw(self, index: int, ext: str) -> memoryview:
        """The bytes of one member (a view into the mapped shard); LookupError if absent."""
        offset = int(self.index.offsets[ext][index])
        if offset < 0:
            raise LookupError(f"the sample has no .{ext} member")
        size = int(self.index.sizes[ext][index])
        return self._buffer(int(self.index.shard_of(index)))[offset : offset + size]

    def _members(
        self, indices: np.ndarray, exts: Sequence[str]
    ) -> tuple[list[memoryview], list[str]]:
        """Views of one member per sample (empty views where a sample has none of `exts`)
        and each one's extension: slicing memoryviews of the maps is the cheapest
        per-sample step there is."""
        if len(exts) == 1 and exts[0] in self.index.offsets:  # one extension: no choice
            offsets = self.index.offsets[exts[0]][indices]
            sizes = self.index.sizes[exts[0]][indices]
            present = offsets >= 0
            names = [exts[0]] * len(indices)
        else:
            which, offsets, present = self._choose(indices, exts)
            sizes = np.stack([self.index.sizes.get(ext, offsets)[indices] for ext in exts])
            sizes = sizes[which, np.arange(len(indices))]
            names = [exts[w] for w in which.tolist()]
        sizes = np.where(present, sizes, 0)
        offsets = np.where(present, offsets, 0)
        ends = (offsets + sizes).tolist()
        shards = self.index.shard_of(indices).tolist()
        buffers = {shard: self._buffer(shard) for shard in set(shards)}
        views = [buffers[s][o:e] for s, o, e in zip(shards, offsets.tolist(), ends, strict=True)]
        return views, names

    def _error(self, index: int, message: str) -> DataError:
        path = self._shard_label(int(self.index.shard_of(index)))
        return DataError(f"{path}: key {self.index.keys[index]}: {message}")

    # -- samples ----------------------------------------------------------------

    def __len__(self) -> int:
        return self.index.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        batch = self.__getitems__([index])
        return batch.inputs[0], int(batch.targets[0])

    def __getitems__(self, refs: MicroBatch | Sequence[int]) -> Batch:
        if isinstance(refs, MicroBatch):
            return self.fetch(refs.indices, refs.padded, refs.epoch)
        indices = np.asarray(refs, dtype=np.int64)
        return self.fetch(indices, np.zeros(len(indices), dtype=bool))

    def fetch(self, indices: np.ndarray, padded: np.ndarray, epoch: int = 0) -> Batch:
        """Read and decode one micro-batch (padded samples come out valid=False); images
        are decoded and augmented for `epoch` by `self.images` (ddp.data.images)."""
        if self.images is not None:
            return self.images.fetch(self, indices, padded, epoch)
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

    def labels(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The samples' labels and which are good (a bad one raises, or with
        on_error="skip" comes back False, labelled 0)."""
        return self._decode_targets(indices)

    def input_member(self, index: int) -> memoryview:
        """The bytes of a sample's input member (the first of `input_exts` it has)."""
        (member,), _ = self._members(np.array([index], dtype=np.int64), self.input_exts)
        return member

    def sample_name(self, index: int) -> str:
        """'SHARD: key KEY': how messages name a sample."""
        return f"{self._shard_label(int(self.index.shard_of(index)))}: key {self.index.keys[index]}"

    def _fail(self, index: int, message: str) -> None:
        """Raise, or (on_error="skip") let the caller mark the sample invalid."""
        if self.on_error == "raise":
            raise self._error(index, message)

    def _decode_targets(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ok = np.ones(len(indices), dtype=bool)
        recorded = self._recorded_labels(indices)
        if recorded is not None:
            return recorded, ok
        members, exts = self._members(indices, self.label_key.exts)
        if self.label_key.plain and self.label_key.exts[0] in LABEL_EXTS and len(indices):
            fast = parse_labels(members, len(indices))
            if fast is not None and self._in_range(fast):
                return fast, ok
        targets = np.zeros(len(indices), dtype=np.int64)
        for i, (index, member, ext) in enumerate(zip(indices, members, exts, strict=True)):
            try:
                targets[i] = self.label_key.decode(ext, member, self.num_classes)
            except Exception as err:  # noqa: BLE001 - any decode failure is bad data
                self._fail(int(index), f"undecodable .{ext}: {describe(err)}")
                ok[i] = False
        return targets, ok

    def _recorded_labels(self, indices: np.ndarray) -> np.ndarray | None:
        """The labels `ddp-shards index` read from these samples' members into the index,
        where it read one for each (a plain integer label): no member is touched. None
        sends the batch to the members, which name a culprit."""
        if not self.label_key.plain or not len(indices):
            return None
        column = self.index.labels.get(self.label_key.exts[0])
        if column is None:
            return None
        labels = column[indices]
        if (labels == NO_LABEL).any() or not self._in_range(labels):
            return None
        return labels

    def _in_range(self, labels: np.ndarray) -> bool:
        n = self.num_classes
        return n is None or len(labels) == 0 or (labels.min() >= 0 and labels.max() < n)

    def _decode_inputs(self, indices: np.ndarray) -> tuple[np.ndarray | list, np.ndarray]:
        members, exts = self._members(indices, self.input_exts)
        if exts.count("npy") == len(exts):
            fast = gather_npy(members)
            if fast is not None:
                return fast, np.ones(len(indices), dtype=bool)
        arrays: list[np.ndarray | None] = []
        ok = np.ones(len(indices), dtype=bool)
        for i, (index, member, ext) in enumerate(zip(indices, members, exts, strict=True)):
            try:
                arrays.append(decode_input(ext, member))
            except Exception as err:  # noqa: BLE001 - any decode failure is bad data
                self._fail(int(index), f"undecodable .{ext}: {describe(err)}")
                arrays.append(None)
                ok[i] = False
        self._check_shapes(indices, arrays, ok)
        return arrays, ok

    def _check_shapes(self, indices: np.ndarray, arrays: list, ok: np.ndarray) -> None:
        """Samples whose shape is not the batch's most common one are bad data, named
        (not the majority: a batch of 63 good 8x8 images and one 9x9 names the 9x9)."""
        shapes = Counter(a.shape for a in arrays if a is not None)
        if len(shapes) <= 1:
            return
        common = shapes.most_common(1)[0][0]
        for i, array in enumerate(arrays):
            if array is not None and array.shape != common:
                self._fail(
                    int(indices[i]),
                    f"shape {array.shape} differs from the batch's {common} (inputs are "
                    "stacked as stored: images of mixed sizes need data.augment)",
                )
                arrays[i], ok[i] = None, False

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
                    (member,), (ext,) = self._members(np.array([index]), self.input_exts)
                    self._template = decode_input(ext, member)
                    break
                except Exception:  # noqa: BLE001, S112 - looking for any decodable sample
                    continue
            else:
                raise DataError(f"{self.split_dir}: no decodable .{self.input_key} sample at all")
        return self._template
