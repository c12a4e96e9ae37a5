"""Remote shards fetched ahead of a rank's reads: the epoch order is known, so the shards
the coming micro-batches need are fetched into the node's cache (ddp.data.cache) on a
thread, in the order they are first needed, within the room the cache leaves."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from ddp.data.cache import RemoteSplit


class Prefetcher:
    """Fetches the shards a rank's coming micro-batches need, in the order they are first
    needed, at most `ahead` shards that the consumer has not read yet (a shard fetched
    ahead is touched by the reader before the next one can evict it). It
    walks the epoch order itself (pure, O(1) a position) on its thread: O(shards)
    memory, never a list of the epoch's samples. Best effort: a failure is left for the
    reader's own fetch to report (with its retries and its timeout)."""

    def __init__(
        self,
        split: RemoteSplit,
        shard_of: Callable[[np.ndarray], np.ndarray],
        micro_batches: Iterable[Any],
        ahead: int,
        held: Callable[[int], bool] = lambda shard: False,
    ):
        self.split, self.shard_of, self.micro_batches = split, shard_of, micro_batches
        self.ahead = ahead
        self.held = held
        """Shards the reader holds pinned already: in the cache until it lets go, so
        nothing to fetch (a warm epoch of a long-lived loader fetches nothing)."""
        self.fetched: list[int] = []
        """Shards fetched (or found in the cache), in order: what the tests read."""
        self._consumed = 0
        self._stop = False
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None

    def start(self) -> Prefetcher:
        if self.ahead > 0:
            self._thread = threading.Thread(target=self._run, name="shard-prefetch", daemon=True)
            self._thread.start()
        return self

    def consumed(self, micro_batches: int) -> None:
        """The consumer has taken this many micro-batches of the epoch."""
        with self._cv:
            self._consumed = micro_batches
            self._cv.notify()

    def stop(self) -> None:
        """Stop fetching ahead; returns once a download in flight has ended (it is bounded
        by the timeout), so nothing is left half-written behind a loader that is done."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        seen: set[int] = set()
        ahead: collections.deque[int] = collections.deque()  # first-need positions
        for position, micro in enumerate(self.micro_batches):
            for shard in np.unique(self.shard_of(np.asarray(micro.indices))).tolist():
                if shard in seen:
                    continue
                seen.add(shard)
                if self.held(shard):
                    continue
                with self._cv:
                    while not self._stop:
                        while ahead and ahead[0] < self._consumed:
                            ahead.popleft()  # the consumer has read it (and touched it)
                        if len(ahead) < self.ahead:
                            break
                        self._cv.wait()
                    if self._stop:
                        return
                ahead.append(position)
                try:
                    self.split.fetch(shard)
                    self.fetched.append(shard)
                except Exception:  # noqa: BLE001 - the reader's own fetch reports it
                    continue
            if len(seen) == len(self.split.names):
                return
