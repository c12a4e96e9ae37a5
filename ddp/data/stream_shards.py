"""What one stream of the streaming mode reads (ddp.data.streaming): its share of the
epoch's shards (`stream_share`, a pure function of seed, epoch, rank and worker), each
shard's samples front to back (`read_shard`), and webdataset's buffer shuffle."""

from __future__ import annotations

import contextlib
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ddp.errors import DataError
from ddp.order import epoch_order
from ddp.shards.tar import iter_members, split_member_name

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
class RawSample:
    """One sample as read: its members' bytes, not decoded yet."""

    url: str
    key: str
    index: int
    """Index in the split (from the manifest), -1 without one."""
    members: dict[str, bytes]


def read_shard(url: str, keys: list[str] | None, start: int) -> Iterator[RawSample]:
    """The samples of one tar, front to back; DataError naming the URL on failure."""
    from webdataset.gopen import gopen

    stream = None
    position = 0
    try:
        stream = gopen(url, "rb")
        key, members = None, {}
        for name, data in iter_members(stream, url):
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
        reason, stream = _close(stream, url), None
        if reason:  # a pipe that failed after (or instead of) writing a tar
            raise DataError(f"{url}: unreadable shard ({reason})")
    except FileNotFoundError as err:
        raise DataError(f"{url}: shard missing") from err
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        reason = _close(stream, url) or f"{type(err).__name__}: {err}"
        stream = None
        raise DataError(f"{url}: unreadable shard ({reason})") from err
    finally:
        # Leaving early (the stream's quota is met) closes pipes: SIGPIPE is not an error.
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.close()


class Interrupted(DataError):
    """A pipe killed by a signal: the job is being stopped (a launcher ends every process
    group after another rank failed), not a bad shard. Said by nobody: the rank that
    failed first has said why."""

    shown = False


def _close(stream: Any, url: str) -> str | None:
    """Close a gopen stream; a pipe's bad exit status, as a reason, or None."""
    if stream is None:
        return None
    try:
        stream.close()
    except Exception as err:  # noqa: BLE001 - webdataset's Pipe raises a bare IOError
        status = getattr(stream, "status", None)
        if isinstance(status, int) and status < 0:
            raise Interrupted(f"{url}: the command was killed by signal {-status}") from err
        return f"the command exited with status {status}" if status is not None else f"{err}"
    return None


def _sample(
    url: str, key: str, members: dict[str, bytes], keys: list[str] | None, start: int, pos: int
) -> RawSample:
    if keys is None:
        return RawSample(url, key, -1, members)
    if pos >= len(keys) or keys[pos] != key:
        expected = keys[pos] if pos < len(keys) else "the end of the shard"
        raise DataError(
            f"{url}: sample {pos} is {key!r} but the manifest says {expected!r} "
            "(stale manifest: re-run `ddp-shards index`)"
        )
    return RawSample(url, key, start + pos, members)


def buffer_shuffle(
    samples: Iterator[RawSample], size: int, rng: np.random.Generator
) -> Iterator[RawSample]:
    """webdataset's shuffle: fill a buffer, then emit a random slot and refill it."""
    if size <= 1:
        yield from samples
        return
    buffer: list[RawSample] = []
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
