"""Streaming mode: tar shards behind URLs, read front to back.

For shards that cannot be seeked (`pipe:` commands, http(s), object stores through
webdataset's `gopen`), the exact loader's random access is out of reach. This
loader trades exact coverage for sequential reads and keeps the one guarantee DDP
cannot live without: every rank yields exactly `plan.micro_batches_per_epoch`
micro-batches (fewer after a resume), whatever the shards and the worker count.

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
import shlex
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ddp.data import (
    Batch,
    LoaderOptions,
    _as_input_tensor,
    _npy_header,
    _shutdown_workers,
    loader_for,
)
from ddp.order import epoch_order
from ddp.plan import BatchPlan
from ddp.shards.decode import decode_member
from ddp.shards.index import split_member_name
from ddp.shards.manifest import MANIFEST_NAME, DataError, Manifest, read_manifest

__all__ = [
    "StreamLoader",
    "StreamShare",
    "build_stream_loader",
    "expand_urls",
    "stream_num_samples",
    "stream_share",
]

Transform = Callable[[torch.Tensor], torch.Tensor]

_MAX_SKIPPED_IN_A_ROW = 1000
"""on_error="skip" gives up on a stream that yields nothing decodable (it would
otherwise cycle over its shards for ever)."""


# --------------------------------------------------------------------------- urls


def expand_urls(urls: Sequence[str] | str) -> list[str]:
    """A list as it is; a string through webdataset's expansion (brace patterns,
    `::`-separated lists): "pipe:cat /d/shard-{000000..000003}.tar" gives four."""
    if isinstance(urls, str):
        from webdataset.shardlists import expand_urls as wds_expand

        expanded = list(wds_expand(urls))
    else:
        expanded = [str(u) for u in urls]
    if not expanded:
        raise DataError(f"no shard URLs in {urls!r}")
    return expanded


def local_path(url: str) -> Path | None:
    """The file behind a plain path, a file:// URL or `pipe:cat PATH`; None otherwise."""
    if url.startswith("pipe:"):
        try:
            words = shlex.split(url[5:])
        except ValueError:
            return None
        return Path(words[1]) if len(words) == 2 and words[0] == "cat" else None
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(url) if parsed.scheme == "" else None


def _opened_directly(url: str) -> bool:
    """gopen opens plain paths and file:// URLs itself: those can be checked up front."""
    return urlparse(url).scheme in ("", "file") and not url.startswith("pipe:")


@dataclass(frozen=True)
class _ShardIndex:
    """What a manifest beside local shards tells: per URL, its sample keys and the
    index of its first sample in the split."""

    manifest_path: Path
    keys: list[list[str]]
    starts: list[int]

    @property
    def counts(self) -> list[int]:
        return [len(k) for k in self.keys]


def _find_index(urls: list[str], manifest_dir: str | os.PathLike | None) -> _ShardIndex | None:
    """The manifest describing `urls` (given, or beside local shards), matched by name."""
    paths = [local_path(u) for u in urls]
    auto = manifest_dir is None
    if auto:
        if any(p is None for p in paths):
            return None
        manifest_dir = paths[0].parent  # type: ignore[union-attr]
        if not (Path(manifest_dir) / MANIFEST_NAME).is_file():
            return None
    manifest_dir = Path(manifest_dir)
    manifest: Manifest = read_manifest(manifest_dir)
    starts, start = {}, 0
    for shard in manifest.shards:
        starts[shard.name] = (start, shard)
        start += shard.num_samples
    keys, first = [], []
    for url, path in zip(urls, paths, strict=True):
        name = _name_in(path, manifest_dir) if path is not None else None
        if name is None and auto:
            return None  # the shards are not all beside the manifest: it is not theirs
        if name is None:
            name = url.rstrip("/").rsplit("/", 1)[-1]
        if name not in starts:
            raise DataError(
                f"{url}: not listed in {manifest_dir / MANIFEST_NAME} (re-run "
                f"`ddp-shards index {manifest_dir}`, or leave the manifest out)"
            )
        begin, shard = starts[name]
        if path is not None and path.is_file() and path.stat().st_size != shard.size:
            raise DataError(
                f"{path}: {path.stat().st_size:,} bytes but the manifest says {shard.size:,} "
                f"(re-run `ddp-shards index {manifest_dir}`)"
            )
        keys.append(shard.keys)
        first.append(begin)
    return _ShardIndex(manifest_dir / MANIFEST_NAME, keys, first)


def _name_in(path: Path, directory: Path) -> str | None:
    try:
        return str(path.resolve().relative_to(directory.resolve()))
    except ValueError:
        return None


def stream_num_samples(
    urls: Sequence[str] | str, manifest_dir: str | os.PathLike | None = None
) -> int:
    """N of the streamed shards, from the manifest beside them (or in `manifest_dir`);
    DataError when there is none: then the config must declare data.num_samples."""
    url_list = expand_urls(urls)
    index = _find_index(url_list, manifest_dir)
    if index is None:
        raise DataError(
            f"{url_list[0]}: no manifest beside the shards to count their samples; "
            "set data.num_samples"
        )
    return sum(index.counts)


# --------------------------------------------------------------------------- shares


@dataclass(frozen=True)
class StreamShare:
    """What one (rank, worker) stream reads in one epoch."""

    shards: tuple[int, ...]
    """Positions in the URL list, in reading order."""
    rank_modulo: tuple[int, int] | None = None
    """(rank, world_size): keep every world_size-th sample of the shards, from rank
    (fewer shards than ranks)."""
    worker_modulo: tuple[int, int] | None = None
    """(worker, num_workers): of what the rank keeps, every num_workers-th sample
    (fewer of the rank's shards than workers)."""

    def num_samples(self, counts: Sequence[int]) -> int:
        """Samples the share holds, given every shard's sample count."""
        total = sum(counts[s] for s in self.shards)
        for modulo in (self.rank_modulo, self.worker_modulo):
            if modulo is not None:
                total = len(range(modulo[0], total, modulo[1]))
        return total


def stream_share(
    num_shards: int, seed: int, epoch: int, rank: int, world_size: int, worker: int, workers: int
) -> StreamShare:
    """Rank `rank`, worker `worker`'s share of the epoch: a pure function.

    Shards go round-robin to ranks, then a rank's shards round-robin to its
    workers, so a rank's samples are the same for any worker count. Only where
    there are too few shards do streams split by sample position instead (each
    then reads the whole shard it shares with others).
    """
    if not 0 <= rank < world_size or not 0 <= worker < workers:
        raise ValueError(f"rank {rank}/{world_size}, worker {worker}/{workers} out of range")
    order = tuple(int(s) for s in epoch_order(num_shards, seed, epoch))
    rank_modulo = None
    if num_shards >= world_size:
        mine = order[rank::world_size]
    else:
        mine, rank_modulo = order, (rank, world_size)
    if len(mine) >= workers:
        return StreamShare(mine[worker::workers], rank_modulo)
    return StreamShare(mine, rank_modulo, (worker, workers))


# --------------------------------------------------------------------------- reading


@dataclass
class _Raw:
    """One sample as read: its members' bytes, not decoded yet."""

    url: str
    key: str
    index: int
    """Index in the split (from the manifest), -1 without one."""
    members: dict[str, bytes]


def _read_shard(url: str, keys: list[str] | None, start: int) -> Iterator[_Raw]:
    """The samples of one tar, front to back; DataError naming the URL on failure."""
    from webdataset.gopen import gopen

    stream = None
    position = 0
    try:
        stream = gopen(url, "rb")
        key, members = None, {}
        for name, data in _tar_members(stream, url):
            parts = split_member_name(name)
            if parts is None:
                continue
            if parts[0] != key and key is not None:
                yield _sample(url, key, members, keys, start, position)
                position, members = position + 1, {}
            key = parts[0]
            members[parts[1]] = data
        if key is not None:
            yield _sample(url, key, members, keys, start, position)
        reason, stream = _close(stream), None
        if reason:  # a pipe that failed after (or instead of) writing a tar
            raise DataError(f"{url}: unreadable shard ({reason})")
    except FileNotFoundError as err:
        raise DataError(f"{url}: shard missing") from err
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        reason = _close(stream) or f"{type(err).__name__}: {err}"
        stream = None
        raise DataError(f"{url}: unreadable shard ({reason})") from err
    finally:
        # Leaving early (the stream's quota is met) closes pipes: SIGPIPE is not an error.
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.close()


_COMPRESSED = (".gz", ".tgz", ".bz2", ".xz")


def _tar_members(stream: Any, url: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular members, in order. Plain tars go through a small
    header parser (about five times faster than tarfile's stream mode, which the
    loader would otherwise spend most of its time in); compressed ones through tarfile."""
    if url.endswith(_COMPRESSED):
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if info.isreg():
                    yield info.name, tar.extractfile(info).read()  # type: ignore[union-attr]
        return
    long_name: str | None = None
    pax: dict[str, str] = {}
    first = True
    while True:
        header = _read_exactly(stream, 512)
        if not header and first:
            raise EOFError("empty shard")
        if not header or header == _ZERO_BLOCK:
            return  # end of archive (a missing end marker is tolerated, as tarfile does)
        first = False
        _check_header(header)
        size = int(pax["size"]) if "size" in pax else _tar_number(header[124:136])
        data = _read_exactly(stream, size)
        if len(data) != size or len(_read_exactly(stream, -size % 512)) != -size % 512:
            raise EOFError("unexpected end of data (truncated tar)")
        kind = header[156:157]
        if kind == b"L":  # GNU long name for the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif kind == b"x":  # pax header for the next member
            pax = _pax_records(data)
        elif kind != b"g":
            if kind in (b"0", b"\0", b"7"):
                yield pax.get("path") or long_name or _ustar_name(header), data
            long_name, pax = None, {}


_ZERO_BLOCK = bytes(512)


def _read_exactly(stream: Any, size: int) -> bytes:
    """`size` bytes, fewer only at the end of the stream."""
    data = stream.read(size) if size else b""
    while 0 < len(data) < size:
        more = stream.read(size - len(data))
        if not more:
            break
        data += more
    return data


def _check_header(header: bytes) -> None:
    if len(header) != 512:
        raise EOFError("unexpected end of data (truncated tar header)")
    try:
        stored = _tar_number(header[148:156])
    except ValueError:
        stored = -1
    if stored != sum(header[:148]) + 256 + sum(header[156:]):
        raise tarfile.HeaderError("bad tar header checksum (not a tar, or corrupt)")


def _tar_number(field: bytes) -> int:
    """An octal (or GNU base-256) number field of a tar header."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "replace")


def _pax_records(data: bytes) -> dict[str, str]:
    """pax extended header records: "LEN key=value\n" each."""
    records, at = {}, 0
    while at < len(data) and data[at : at + 1] != b"\0":
        length = int(data[at : data.index(b" ", at)])
        key, _, value = data[data.index(b" ", at) + 1 : at + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        at += length
    return records


def _close(stream: Any) -> str | None:
    """Close a gopen stream; a pipe's bad exit status, as a reason, or None."""
    if stream is None:
        return None
    try:
        stream.close()
    except Exception as err:  # noqa: BLE001 - webdataset's Pipe raises a bare IOError
        status = getattr(stream, "status", None)
        return f"the command exited with status {status}" if status is not None else f"{err}"
    return None


def _sample(
    url: str, key: str, members: dict[str, bytes], keys: list[str] | None, start: int, pos: int
) -> _Raw:
    if keys is None:
        return _Raw(url, key, -1, members)
    if pos >= len(keys) or keys[pos] != key:
        expected = keys[pos] if pos < len(keys) else "the end of the shard"
        raise DataError(
            f"{url}: sample {pos} is {key!r} but the manifest says {expected!r} "
            "(stale manifest: re-run `ddp-shards index`)"
        )
    return _Raw(url, key, start + pos, members)


def _buffer_shuffle(samples: Iterator[_Raw], size: int, rng: np.random.Generator) -> Iterator[_Raw]:
    """webdataset's shuffle: fill a buffer, then emit a random slot and refill it."""
    if size <= 1:
        yield from samples
        return
    buffer: list[_Raw] = []
    picks: list[int] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        if not picks:
            picks = rng.integers(0, size, 1024).tolist()
        slot = picks.pop()
        buffer[slot], sample = sample, buffer[slot]
        yield sample
    for slot in rng.permutation(len(buffer)).tolist():
        yield buffer[slot]


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
        index: _ShardIndex | None,
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
        self.workers = max(1, options.num_workers)
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
            yield _Item(-1, None, error=str(err))

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
                decode = position >= first or self.options.on_error == "skip"
                batch, passes = self._micro_batch(samples, decode)
                fresh += passes.count(0)
                repeats += len(passes) - passes.count(0)
                if position >= first:
                    yield _Item(position, batch, fresh, repeats)
                    fresh = repeats = 0

    def _passes(self, share: StreamShare, rng: np.random.Generator) -> Iterator[tuple[_Raw, int]]:
        """The share's samples, buffer-shuffled, pass after pass: (sample, pass number)."""
        for number in range(1 << 62):
            count = 0
            for sample in _buffer_shuffle(self._read_share(share), self.shuffle_buffer, rng):
                count += 1
                yield sample, number
            if count == 0:
                names = ", ".join(self.urls[s] for s in share.shards[:3]) or "no shard"
                raise DataError(
                    f"rank {self.rank}'s stream has no samples ({names}"
                    f"{', ...' if len(share.shards) > 3 else ''}): use fewer DataLoader "
                    "workers or more shards"
                )

    def _read_share(self, share: StreamShare) -> Iterator[_Raw]:
        taken = kept = 0
        for shard in share.shards:
            keys = self.index.keys[shard] if self.index else None
            start = self.index.starts[shard] if self.index else -1
            for sample in _read_shard(self.urls[shard], keys, start):
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
        self, samples: Iterator[tuple[_Raw, int]], decode: bool
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
        tensor = _as_input_tensor(np.stack(inputs))
        if self.transform is not None:
            tensor = torch.stack([self.transform(x) for x in tensor])
        batch = Batch(
            inputs=tensor,
            targets=torch.tensor(targets, dtype=torch.int64),
            valid=torch.ones(len(targets), dtype=torch.bool),
            indices=torch.tensor(indices, dtype=torch.int64),
            num_skipped=skipped,
        )
        return batch, passes

    def _decode(self, sample: _Raw, like: np.ndarray | None) -> tuple[np.ndarray, int] | None:
        """(input, label), or None for a bad sample when on_error="skip"."""
        try:
            values = []
            for ext in (self.options.input_key, self.options.target_key):
                if ext not in sample.members:
                    found = ", ".join(sorted(sample.members)) or "none"
                    raise LookupError(f"no .{ext} member (members: {found})")
                values.append(_decode(ext, sample.members[ext]))
            array, label = np.asarray(values[0]), int(values[1])
            if like is not None and array.shape != like.shape:
                raise ValueError(f"shape {array.shape} differs from the batch's {like.shape}")
        except Exception as err:  # noqa: BLE001 - any decode failure is bad data
            if self.options.on_error == "raise":
                kind = "" if isinstance(err, LookupError) else f"{type(err).__name__}: "
                raise DataError(f"{sample.url}: key {sample.key}: {kind}{err}") from err
            return None
        return array, label


def _decode(ext: str, data: bytes) -> Any:
    """decode_member, with the exact loader's fast path for plain npy members."""
    if ext == "npy":
        header = _npy_header(memoryview(data))
        if header is not None:
            head, dtype, shape = header
            if len(head) + dtype.itemsize * int(np.prod(shape)) == len(data):
                return np.frombuffer(data, dtype, offset=len(head)).reshape(shape)
    return decode_member(ext, data)


# --------------------------------------------------------------------------- loader


class StreamLoader:
    """One rank's training micro-batches from streamed shards, epoch by epoch.

    The same interface as `ddp.data.TrainLoader`. `valid` is all True: repeats
    are real training samples, counted in `repeats`. `indices` are the samples'
    indices in the split when a manifest describes the shards (`indexed`), else -1.
    After each epoch: `samples_read` (first-pass samples used), `repeats`, and
    `dropped` (samples of this rank's share left unread; None without a manifest,
    then the job-wide number is num_samples minus the sum of samples_read).
    """

    def __init__(self, dataset: _StreamDataset, options: LoaderOptions):
        self.dataset, self.plan = dataset, dataset.plan
        self.indexed = dataset.index is not None
        self.num_skipped = 0
        """Bad samples skipped so far (on_error="skip"), summed over workers."""
        self.samples_read = 0
        self.repeats = 0
        self.dropped: int | None = None
        self._loader = loader_for(dataset, options, batch_size=None)

    def close(self) -> None:
        """Stop the DataLoader workers (persistent ones otherwise live with the loader)."""
        _shutdown_workers(self._loader)

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
        if not 0 <= start_step <= plan.iterations_per_epoch:
            raise ValueError(
                f"start_step={start_step} is outside the epoch's "
                f"{plan.iterations_per_epoch} iterations"
            )
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be >= 0")
        self.dataset.set_epoch(epoch, start_step)
        self.samples_read = self.repeats = 0
        self.dropped = None
        following = start_step * plan.accumulate
        waiting: dict[int, Batch] = {}
        for item in self._loader:
            if item.error is not None:
                _shutdown_workers(self._loader)
                raise DataError(item.error)
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
    urls: list[str] | str,
    plan: BatchPlan,
    rank: int,
    seed: int,
    options: LoaderOptions | None = None,
    shuffle_buffer: int = 1000,
    transform: Transform | None = None,
    manifest_dir: str | os.PathLike | None = None,
) -> StreamLoader:
    """A StreamLoader over `urls` (a list, or a brace pattern for webdataset).

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
    url_list = expand_urls(urls)
    for url in url_list:
        path = local_path(url)
        if _opened_directly(url) and path is not None and not path.is_file():
            raise DataError(f"{url}: shard missing")
    index = _find_index(url_list, manifest_dir)
    if index is not None and sum(index.counts) != plan.num_samples:
        raise DataError(
            f"{index.manifest_path}: the plan is for {plan.num_samples:,} samples but the "
            f"streamed shards hold {sum(index.counts):,}"
        )
    dataset = _StreamDataset(url_list, index, plan, rank, seed, options, shuffle_buffer, transform)
    return StreamLoader(dataset, options)
