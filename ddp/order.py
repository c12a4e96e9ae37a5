"""The epoch order: which sample every rank consumes at every micro-step.

Pure functions of (plan, seed, epoch, rank): no process group, no data, no
DataLoader workers. Every rank computes the same global sequence for an epoch and
takes its own slice of each global batch, so

- every sample is used exactly once per epoch (plus padding, or minus the
  dropped remainder with drop_last),
- every rank gets exactly `plan.micro_batches_per_epoch` micro-batches,
- the global order does not depend on the world size: global batch b is always
  `sequence[b*G:(b+1)*G]`, and ranks cut it into contiguous slices in rank order,
- resuming at (epoch, step) seeks straight to `step * G` in the sequence.

The sequence is never materialised: the sample at position p is `π(p)`, where π is
a keyed permutation of [0, N) computed per position (`EpochPermutation`). Memory and
the cost of a seek do not depend on N; a billion-sample epoch costs what a thousand-
sample one does.

π is a Feistel network on the mixed-radix domain Z_a × Z_b (a close to √N, b = ⌈N/a⌉,
so a·b − N < a; `radix`), with cycle walking back into [0, N):

- a bijection: each round maps (L, R) ∈ Z_m × Z_n to (R, (L + F(R)) mod m) ∈ Z_n × Z_m,
  undone by L = (R' − F(R)) mod m whatever F is; an even number of rounds returns to
  Z_a × Z_b, and x ↔ (x // b, x % b) numbers it as [0, a·b). Cycle walking (apply
  the network again until the value lands in [0, N)) turns that permutation of
  [0, a·b) into one of [0, N): the walk from x stays on x's cycle, which holds x
  itself, so it ends; and two inputs cannot meet, since walking back from an output
  through out-of-range values reaches exactly one in-range predecessor.
- O(1) per position: fewer than a of the a·b values lie outside [0, N), a fraction
  below 1/b ≈ 1/√N, so a walk takes one network evaluation plus ~1/√N more on
  average (at most a·b − N).
- random enough: six rounds (24 up to N = SMALL) of a keyed 64-bit multiply-
  xorshift-multiply mix, round keys from SeedSequence((seed, epoch)); Luby-Rackoff
  needs three or four rounds for a pseudo-random permutation. tests/test_order.py
  holds it to a true shuffle's statistics (shard runs, rank correlation, neighbour
  gaps, epoch-to-epoch independence, where a sample lands, which orders of a tiny N
  come up); four rounds pass them too, two do not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from numpy.random import SeedSequence  # numpy loads it lazily: now, not on the first seek

from ddp.errors import ConfigError
from ddp.plan import BatchPlan

ROUNDS = 6
"""Feistel rounds (even: the state returns to Z_a × Z_b)."""

SMALL = 1 << 12
"""Up to this N, four times the rounds: a tiny domain needs more of them to come close
to a uniformly random permutation (N = 6: the orders drawn by six or twelve rounds are
told apart from a true shuffle's by a χ² test, by 24 they are not), and there the cost
per index does not matter."""

RADIX_TRIES = 4096
"""How many splits a·b of the domain `radix` considers."""

BLOCK = 8192
"""Positions computed per call in `rank_micro_batches`: large enough that numpy's
per-call overhead vanishes, small enough to stay O(1) in memory."""

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@dataclass(frozen=True)
class MicroBatch:
    """The sample indices one rank runs forward/backward at once."""

    step: int
    """Iteration (optimizer update) within the epoch this micro-batch belongs to."""
    micro: int
    """Position within the step's accumulation, 0 .. accumulate-1."""
    indices: np.ndarray
    """int64 sample indices into the split, in consumption order."""
    padded: np.ndarray
    """bool per sample: True for repeats that only fill up a batch."""
    epoch: int = 0
    """The epoch it belongs to (image augmentation draws from (seed, epoch, sample))."""

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class EpochPermutation:
    """π, a keyed permutation of [0, num_samples) for one (seed, epoch): `perm(positions)`
    gives the samples at those positions of the epoch's order. Holds a few integers."""

    num_samples: int
    radix: tuple[int, int]
    """(a, b): the network permutes Z_a × Z_b, a·b >= num_samples."""
    keys: tuple[int, ...]
    """One 64-bit key per round (an even number of rounds)."""

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.num_samples):
            raise ValueError(f"positions must lie in [0, {self.num_samples})")
        return self._walk(self.network(positions.view(np.uint64)), self.network)

    def padding(self, positions: np.ndarray) -> np.ndarray:
        """The positions whose samples fill positions N.. of a padded last global batch:
        the epoch's first (p − N; G <= N, so p − N < N)."""
        return positions - self.num_samples

    def table(self) -> np.ndarray:
        """All of π at once (int64, N values): the network over its whole domain in one
        call, then the walks by lookups in that table instead of more network calls."""
        a, b = self.radix
        network = self.network(np.arange(a * b, dtype=np.uint64))
        return self._walk(network[: self.num_samples], network.__getitem__)

    def _walk(self, out: np.ndarray, step: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Cycle walking: apply the network again to values outside [0, N) (~1/√N of them,
        once or twice) until they land inside."""
        walking = np.flatnonzero(out >= self.num_samples)
        while walking.size:
            out[walking] = step(out[walking])
            walking = walking[out[walking] >= self.num_samples]
        return out.view(np.int64)

    def network(self, x: np.ndarray) -> np.ndarray:
        """The Feistel network on [0, a·b) (uint64 in, uint64 out). In place, on two
        scratch arrays: numpy's temporaries would cost more than the arithmetic."""
        a, b = self.radix
        left, right = np.divmod(x, np.uint64(b))
        moduli = (np.uint64(a), np.uint64(b))
        mixed, scratch = np.empty_like(x), np.empty_like(x)
        for i, key in enumerate(self.keys):
            modulus = moduli[i % 2]  # left's: a, b, a, b, ...
            _round_function(right, key, modulus, mixed, scratch)
            mixed += left  # < 2 * modulus: one conditional subtraction reduces it
            np.subtract(mixed, modulus, out=scratch)  # wraps around when mixed < modulus
            np.minimum(mixed, scratch, out=mixed)
            left, right, mixed = right, mixed, left
        left *= np.uint64(b)
        left += right
        return left


def _round_function(
    x: np.ndarray, key: int, modulus: np.uint64, out: np.ndarray, scratch: np.ndarray
) -> None:
    """out = F_key(x) in [0, modulus): x XOR key, multiplied, folded, multiplied again
    (the shape of splitmix64's finaliser: every input bit reaches the top 32), then the
    top 32 bits scaled by a multiply-shift (modulus < 2^32: the product fits in 64 bits).
    In place on `out`; `scratch` is spare room."""
    np.bitwise_xor(x, np.uint64(key), out=out)
    out *= _MIX1
    np.right_shift(out, np.uint64(32), out=scratch)
    out ^= scratch
    out *= _MIX2
    out >>= np.uint64(32)
    out *= modulus
    out >>= np.uint64(32)


def epoch_permutation(
    num_samples: int, seed: int, epoch: int, stream: tuple[int, ...] = ()
) -> EpochPermutation:
    """π for (seed, epoch) over [0, num_samples): a pure function.

    Round keys come from SeedSequence((seed, epoch, *stream)): unrelated for neighbouring
    epochs and seeds (and for the streams the shard-window order draws), and the same on
    every platform.
    """
    if num_samples < 0 or seed < 0 or epoch < 0:
        raise ValueError(
            f"the epoch order needs non-negative values, got num_samples={num_samples}, "
            f"seed={seed}, epoch={epoch}"
        )
    if num_samples >= 1 << 62:
        raise ValueError(f"num_samples={num_samples} is beyond the order's 2^62")
    rounds = ROUNDS if num_samples > SMALL else 4 * ROUNDS
    keys = SeedSequence([seed, epoch, *stream]).generate_state(rounds, dtype=np.uint64)
    return EpochPermutation(num_samples, radix(num_samples), tuple(int(k) for k in keys))


SHARD_STREAM, WINDOW_STREAM = 1, 2
"""Key streams of the shard-window order: the shards' order, each window's own order."""


@dataclass(frozen=True)
class ShardWindows:
    """`data.window_shards`: a locality-aware order. Each epoch the shards are put in a
    keyed random order and cut into windows of `shards` consecutive ones; the samples of
    a window are consumed in a keyed random order of their own before the next window
    starts (MosaicML Streaming's block shuffles, with shard-aligned blocks). Every sample
    still comes once per epoch, the sequence is still one function of the position (the
    same at any world size, a seek costs one window's permutation), but a stretch of the
    epoch reads `shards` shards instead of all of them: a node's cache needs a window or
    two, not the split. The price is randomness: a global batch draws on `shards` shards,
    so shards must not be sorted by label (bench/remote_bench.py measures both sides)."""

    counts: tuple[int, ...]
    """Samples per shard, in manifest order."""
    shards: int
    """Shards per window (>= 1)."""

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ConfigError(f"data.window_shards={self.shards} must be >= 1 (or null)")

    @classmethod
    def of(cls, counts: np.ndarray, shards: int | None) -> ShardWindows | None:
        return None if shards is None else cls(tuple(int(c) for c in counts), shards)


class WindowedPermutation:
    """The shard-window order of one (seed, epoch): `perm(positions)` gives the samples at
    those positions. O(shards) memory (the epoch's shard order and its running counts)."""

    def __init__(self, windows: ShardWindows, seed: int, epoch: int):
        counts = np.asarray(windows.counts, dtype=np.int64)
        self.num_samples = int(counts.sum())
        self.seed, self.epoch = seed, epoch
        self.first_sample = np.concatenate([[0], np.cumsum(counts)])[:-1]
        """Index of each shard's first sample (manifest order)."""
        self.shard_order = epoch_permutation(len(counts), seed, epoch, (SHARD_STREAM,)).table()
        """The epoch's shards, in the order their windows come."""
        self.placed = np.concatenate([[0], np.cumsum(counts[self.shard_order])])
        """Position of each placed shard's first sample in the shard-ordered sequence."""
        self.window_starts = self.placed[:: windows.shards]
        if self.window_starts[-1] != self.num_samples:
            self.window_starts = np.append(self.window_starts, self.num_samples)
        self._windows: dict[int, EpochPermutation] = {}

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.num_samples):
            raise ValueError(f"positions must lie in [0, {self.num_samples})")
        window = np.searchsorted(self.window_starts, positions, side="right") - 1
        placed = np.empty_like(positions)
        for w in np.unique(window).tolist():
            at = np.flatnonzero(window == w)
            lo = int(self.window_starts[w])
            placed[at] = lo + self._window(w)(positions[at] - lo)
        slot = np.searchsorted(self.placed, placed, side="right") - 1
        return self.first_sample[self.shard_order[slot]] + (placed - self.placed[slot])

    def padding(self, positions: np.ndarray) -> np.ndarray:
        """The positions whose samples fill positions N.. of a padded last global batch:
        the epoch's last, backwards (2N − 1 − p), so they come from the last window, whose
        shards are at hand, not the first's, which a small cache has let go."""
        return 2 * self.num_samples - 1 - positions

    def _window(self, w: int) -> EpochPermutation:
        """Window w's own order (the last few kept: a block of positions spans one or two)."""
        perm = self._windows.get(w)
        if perm is None:
            if len(self._windows) >= 4:
                self._windows.clear()
            size = int(self.window_starts[w + 1] - self.window_starts[w])
            perm = epoch_permutation(size, self.seed, self.epoch, (WINDOW_STREAM, w))
            self._windows[w] = perm
        return perm


EpochOrder = EpochPermutation | WindowedPermutation
"""An epoch's order: samples at positions (`__call__`), and what pads the last batch."""


def order_for(
    num_samples: int, seed: int, epoch: int, windows: ShardWindows | None = None
) -> EpochOrder:
    """The epoch's order as a function of positions: over all samples, or by windows."""
    if windows is None:
        return epoch_permutation(num_samples, seed, epoch)
    perm = WindowedPermutation(windows, seed, epoch)
    if perm.num_samples != num_samples:
        raise ValueError(
            f"the shard windows hold {perm.num_samples:,} samples, the plan {num_samples:,}"
        )
    return perm


def radix(num_samples: int) -> tuple[int, int]:
    """(a, b) with a·b >= N, neither more than twice the other (a balanced network mixes
    best), a·b − N least among the RADIX_TRIES values of a just below √N: often 0
    (N = 50,000 = 200 × 250), so cycle walking, whose small arrays cost numpy's per-call
    overhead, is rare or never needed."""
    top = math.isqrt(max(num_samples, 1) - 1) + 1  # the least a with a² >= N
    a = np.arange(top, max(1, top - RADIX_TRIES + 1) - 1, -1, dtype=np.int64)
    b = -(-max(num_samples, 1) // a)
    waste = np.where(b <= 2 * a, a * b - num_samples, np.iinfo(np.int64).max)
    best = int(np.argmin(waste))  # ties keep the larger a: the more balanced
    return int(a[best]), int(b[best])


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The whole permutation of range(num_samples), materialised (int64): for small N
    (streaming's shard order, tests). Training reads it position by position."""
    return epoch_permutation(num_samples, seed, epoch).table()


def sequence_at(
    plan: BatchPlan, perm: EpochOrder, positions: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The samples at `positions` of the epoch's global sequence, and their padding flags.

    Position p < N holds π(p); past N (no drop_last) the last global batch is filled
    with samples of the epoch again: p holds π(perm.padding(p)), flagged as padding.
    """
    positions = np.asarray(positions, dtype=np.int64)
    padded = positions >= plan.num_samples
    return perm(np.where(padded, perm.padding(positions), positions)), padded


def global_sequence(
    plan: BatchPlan, seed: int, epoch: int, windows: ShardWindows | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's samples in global consumption order, and their padding flags.

    Length is `plan.samples_per_epoch`: the order truncated (drop_last) or padded
    with its own first samples so the last global batch is full. Materialised: for
    tests and small N; `rank_micro_batches` computes only what a rank reads.
    """
    perm = order_for(plan.num_samples, seed, epoch, windows)
    return sequence_at(plan, perm, np.arange(plan.samples_per_epoch, dtype=np.int64))


def rank_micro_batches(
    plan: BatchPlan,
    seed: int,
    epoch: int,
    rank: int,
    start_step: int = 0,
    windows: ShardWindows | None = None,
) -> Iterator[MicroBatch]:
    """Rank `rank`'s micro-batches for the epoch, from `start_step` to its end.

    Yields exactly (iterations_per_epoch - start_step) * accumulate micro-batches.
    Positions are computed a block of steps at a time: starting at any step costs
    one block, whatever the position in the epoch, and memory stays one block.
    """
    _check_rank(rank, plan.world_size)
    check_start_step(plan, start_step)
    perm = order_for(plan.num_samples, seed, epoch, windows)
    per_rank, micro = plan.samples_per_rank_per_iteration, plan.micro_size
    steps_per_block = max(1, BLOCK // per_rank)
    offsets = rank * per_rank + np.arange(per_rank, dtype=np.int64)
    for first in range(start_step, plan.iterations_per_epoch, steps_per_block):
        steps = range(first, min(first + steps_per_block, plan.iterations_per_epoch))
        starts = np.arange(steps.start, steps.stop, dtype=np.int64) * plan.global_size
        indices, padded = sequence_at(plan, perm, (starts[:, None] + offsets).ravel())
        for k, step in enumerate(steps):
            for j in range(plan.accumulate):
                lo = k * per_rank + j * micro
                yield MicroBatch(step, j, indices[lo : lo + micro], padded[lo : lo + micro], epoch)


def eval_micro_batches(
    num_samples: int, micro_size: int, rank: int, world_size: int
) -> list[MicroBatch]:
    """Rank `rank`'s share of a validation pass: every sample once across ranks.

    Ranks take contiguous slices (sequential reads within shards) of
    ceil(N / world_size) samples; every rank gets the same number of full
    micro-batches, the shortfall filled with repeats flagged as padding so that
    metrics can exclude them and no rank waits on a collective the others skip.
    """
    if num_samples < 1 or micro_size < 1:
        raise ValueError(
            f"need num_samples >= 1 and micro_size >= 1, got {num_samples}, {micro_size}"
        )
    _check_rank(rank, world_size)
    per_rank = -(-num_samples // world_size)
    num_micro = -(-per_rank // micro_size)
    lo, hi = min(rank * per_rank, num_samples), min((rank + 1) * per_rank, num_samples)
    total = num_micro * micro_size
    filler = np.arange(total - (hi - lo), dtype=np.int64) % num_samples
    indices = np.concatenate([np.arange(lo, hi, dtype=np.int64), filler])
    padded = np.arange(total) >= hi - lo
    cuts = [slice(k, k + micro_size) for k in range(0, total, micro_size)]
    return [MicroBatch(0, j, indices[cut], padded[cut]) for j, cut in enumerate(cuts)]


def check_start_step(plan: BatchPlan, start_step: int) -> None:
    """A resume point must lie within the epoch (its end included: nothing left)."""
    if not 0 <= start_step <= plan.iterations_per_epoch:
        raise ValueError(
            f"start_step={start_step} is outside the epoch's {plan.iterations_per_epoch} iterations"
        )


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
