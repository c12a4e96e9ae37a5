"""Remote splits (ddp.data.remote, ddp.data.cache): the guarantees of a local split over
shards served by nginx and by an S3 server, through a bounded, shared, verified cache."""

from __future__ import annotations

import fcntl
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ddp.data.cache import GB, ShardCache
from ddp.data.loaders import build_eval_loader, build_train_loader
from ddp.data.prefetch import Prefetcher
from ddp.data.remote import Remote
from ddp.data.splits import open_location
from ddp.errors import DataError
from ddp.order import rank_micro_batches
from ddp.plan import make_plan
from ddp.shards import read_manifest
from ddp.shards.manifest import SplitIndex
from tests import harness
from tests.configs import loader_options
from tests.fixtures import smoke_overrides
from tests.harness import records
from tests.servers import BreakingServer, Nginx
from tests.test_data import same

SHARDS = loader_options(in_memory_max_mb=0)
"""Every micro-batch read from the shards (digits would fit in memory)."""
DIGITS_SHARD = 532_480
"""The bytes of a full digits training shard (256 samples; checked by the tests that
size a cache by it)."""


def full_shard(digits_root: Path) -> int:
    sizes = read_manifest(digits_root / "train").table.sizes
    assert int(sizes.max()) == DIGITS_SHARD
    return DIGITS_SHARD


def cache_in(path: Path, max_bytes: int = GB, timeout_s: float = 10, endpoint=None) -> ShardCache:
    return ShardCache(path, max_bytes, Remote(timeout_s=timeout_s, s3_endpoint=endpoint))


def remote_epoch(url, cache, plan, rank=0, epoch=0, start_step=0, prefetch=4, options=SHARDS):
    split_dir, manifest, remote = open_location(url, cache, prefetch)
    loader = build_train_loader(split_dir, plan, rank, 0, options, None, manifest, remote=remote)
    try:
        return list(loader.epoch(epoch, start_step))
    finally:
        loader.close()


def local_epoch(split: Path, plan, rank=0, epoch=0, start_step=0):
    return list(build_train_loader(split, plan, rank, 0, SHARDS).epoch(epoch, start_step))


@pytest.fixture(params=["http", "s3"])
def digits_url(request) -> tuple[str, str | None]:
    """The digits root behind nginx or S3, and the S3 endpoint (None for HTTP)."""
    if request.param == "http":
        return f"{request.getfixturevalue('nginx').url}/digits", None
    return "s3://data/digits", request.getfixturevalue("moto_s3")


def test_a_remote_split_gives_the_very_batches_of_the_local_one(
    digits_url, digits_root: Path, tmp_path: Path
) -> None:
    root, endpoint = digits_url
    cache = cache_in(tmp_path / "cache", endpoint=endpoint)
    plan = make_plan(1438, 64, 16, 2)
    seen: Counter = Counter()
    for rank in range(2):
        batches = remote_epoch(f"{root}/train", cache, plan, rank, epoch=1)
        assert len(batches) == plan.micro_batches_per_epoch
        assert same(batches, local_epoch(digits_root / "train", plan, rank, epoch=1))
        for b in batches:
            seen.update(b.indices[b.valid].tolist())
    assert sorted(seen) == list(range(1438)) and set(seen.values()) == {1}
    assert cache.downloads == 6  # each shard once, for both ranks


@st.composite
def remote_plans(draw: st.DrawFn) -> tuple:
    """A plan over the digits training split, an epoch, a resume step, a window size."""
    world = draw(st.integers(1, 4))
    micro = draw(st.integers(8, 64))
    accumulate = draw(st.integers(1, 3))
    plan = make_plan(1438, micro * accumulate * world, micro, world, draw(st.booleans()))
    start = draw(st.integers(0, plan.iterations_per_epoch - 1))
    return plan, draw(st.integers(0, 5)), start, draw(st.sampled_from([None, 1, 2, 4]))


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(drawn=remote_plans())
@example(drawn=(make_plan(1438, 180, 45, 2, True), 0, 0, 1))  # drop_last leaves a shard out
def test_the_order_properties_hold_for_a_remote_split(
    drawn: tuple, nginx: Nginx, digits_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Over drawn plans (world size, micro-batch, accumulation, drop_last, epoch, window
    size): each rank's batches from nginx are those of the local split; every sample
    comes once across ranks (padding aside) in equal counts; a resume gives the rest."""
    plan, epoch, start, window = drawn
    options = replace(SHARDS, window_shards=window)
    cache = cache_in(tmp_path_factory.mktemp("cache"))
    split_dir, manifest, remote = open_location(f"{nginx.url}/digits/train", cache)
    seen: Counter = Counter()
    read = set()  # shards read, padding included
    for rank in range(plan.world_size):
        remote_loader = build_train_loader(
            split_dir, plan, rank, 0, options, None, manifest, remote=remote
        )
        local_loader = build_train_loader(digits_root / "train", plan, rank, 0, options)
        try:
            batches = list(remote_loader.epoch(epoch))
            assert len(batches) == plan.micro_batches_per_epoch
            assert same(batches, list(local_loader.epoch(epoch)))
            assert same(list(remote_loader.epoch(epoch, start)), batches[start * plan.accumulate :])
        finally:
            remote_loader.close()
            local_loader.close()
        for b in batches:
            seen.update(b.indices[b.valid].tolist())
            read.update(manifest.table.shard_of(b.indices.numpy()).tolist())
    assert set(seen.values()) == {1}
    assert len(seen) == (plan.samples_per_epoch if plan.drop_last else plan.num_samples)
    assert cache.downloads == len(read)  # each shard read once (drop_last may skip one)


def test_resume_mid_epoch_from_a_remote_split_gives_the_rest(nginx: Nginx, tmp_path) -> None:
    plan = make_plan(1438, 32, 8, 2)
    url = f"{nginx.url}/digits/train"
    full = remote_epoch(url, cache_in(tmp_path / "a"), plan, rank=1, epoch=3)
    rest = remote_epoch(url, cache_in(tmp_path / "b"), plan, rank=1, epoch=3, start_step=30)
    assert len(rest) == (plan.iterations_per_epoch - 30) * plan.accumulate
    assert same(rest, full[30 * plan.accumulate :])


def test_the_val_split_is_covered_once_from_a_remote_split(nginx: Nginx, tmp_path) -> None:
    cache = cache_in(tmp_path / "cache")
    split_dir, manifest, remote = open_location(f"{nginx.url}/digits/val", cache)
    seen: Counter = Counter()
    counts = set()
    for rank in range(3):
        loader = build_eval_loader(split_dir, 16, rank, 3, SHARDS, manifest, remote=remote)
        batches = list(loader)
        counts.add(len(batches))
        for b in batches:
            seen.update(b.indices[b.valid].tolist())
    assert len(counts) == 1 and sorted(seen) == list(range(359)) and set(seen.values()) == {1}


def test_a_corrupt_served_shard_is_named_and_never_used(nginx: Nginx, tmp_path: Path) -> None:
    cache = cache_in(tmp_path / "cache")
    plan = make_plan(1438, 64, 16, 1)
    with pytest.raises(DataError) as err:
        remote_epoch(f"{nginx.url}/corrupt/train", cache, plan)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{nginx.url}/corrupt/train/") and ".tar: sha256 " in message
    assert "but the manifest says" in message
    bad = message.split(": ", 1)[0].rsplit("/", 1)[1]
    split_dir = cache.split_dir(f"{nginx.url}/corrupt/train")
    assert not (split_dir / bad).exists() and not list(split_dir.glob("*.part"))


def test_a_missing_split_is_named(nginx: Nginx, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"/nowhere/train/manifest.json: HTTP 404"):
        open_location(f"{nginx.url}/nowhere/train", cache_in(tmp_path / "cache"))


def test_the_cache_never_exceeds_its_bound(nginx: Nginx, digits_root: Path, tmp_path) -> None:
    bound = 3 * full_shard(digits_root)  # half the training split
    cache = cache_in(tmp_path / "cache", bound)
    plan = make_plan(1438, 256, 64, 1)
    split_dir, manifest, remote = open_location(f"{nginx.url}/digits/train", cache, 2)
    loader = build_train_loader(split_dir, plan, 0, 0, SHARDS, None, manifest, remote=remote)
    for epoch in (0,):
        batches = []
        for batch in loader.epoch(epoch):
            assert 0 < cache.used_bytes() <= bound
            batches.append(batch)
        assert same(batches, local_epoch(digits_root / "train", plan, epoch=epoch))
    assert cache.downloads > 6  # shards were evicted and fetched again


def test_shard_windows_fetch_each_shard_once_per_epoch_through_a_small_cache(
    nginx: Nginx, digits_root: Path, tmp_path
) -> None:
    """data.window_shards: with a cache of half the split, the random order above fetches
    shards again within an epoch; windows of 2 shards fetch each shard once per epoch, and
    every sample still comes once."""
    bound = 3 * full_shard(digits_root)
    cache = cache_in(tmp_path / "cache", bound)
    plan = make_plan(1438, 64, 64, 1)
    split_dir, manifest, remote = open_location(f"{nginx.url}/digits/train", cache, 1)
    options = replace(SHARDS, window_shards=2)
    loader = build_train_loader(split_dir, plan, 0, 0, options, None, manifest, remote=remote)
    for epoch in (0, 1):
        downloads = cache.downloads
        seen = []
        for batch in loader.epoch(epoch):
            assert 0 < cache.used_bytes() <= bound
            seen.extend(batch.indices[batch.valid].tolist())
        assert sorted(seen) == list(range(1438))
        fetched = cache.downloads - downloads
        # Epoch 0 fetches all 6; epoch 1 starts with some of them still in the cache.
        assert fetched == 6 if epoch == 0 else 3 <= fetched <= 6, (epoch, fetched)


def test_a_second_loader_reuses_the_cache(nginx: Nginx, tmp_path: Path) -> None:
    plan = make_plan(1438, 64, 16, 1)
    url = f"{nginx.url}/digits/train"
    first = remote_epoch(url, cache_in(tmp_path / "cache"), plan)
    fetched = len(nginx.requests(".tar"))
    again = cache_in(tmp_path / "cache")  # a restart: a new process would see just this
    assert same(remote_epoch(url, again, plan), first)
    assert again.downloads == 0 and len(nginx.requests(".tar")) == fetched


def test_processes_of_a_node_share_one_cache(nginx: Nginx, tmp_path: Path) -> None:
    """Three processes fetch every shard into one cache at once: each is fetched once."""
    url = f"{nginx.url}/digits/train"
    before = Counter(p for p in nginx.requests(".tar") if "/digits/train/" in p)
    script = (
        "import sys; from pathlib import Path; from ddp.data.cache import ShardCache; "
        "from ddp.data.remote import Remote; from ddp.data.splits import open_location; "
        f"cache = ShardCache(Path(sys.argv[1]), 1 << 30, Remote(10)); "
        f"_, m, split = open_location({url!r}, cache); "
        "[split.fetch(s) for s in range(len(split.names))]; print(cache.downloads)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / "cache")], stdout=subprocess.PIPE
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert sum(int(o) for o in outs) == 6
    after = Counter(p for p in nginx.requests(".tar") if "/digits/train/" in p)
    assert after - before == Counter({p: 1 for p in after})


def test_a_server_gone_mid_epoch_stops_with_one_line_naming_the_url(
    served_root: Path, tmp_path: Path
) -> None:
    server = Nginx(served_root, tmp_path / "nginx")
    try:
        cache = cache_in(tmp_path / "cache", 3 * DIGITS_SHARD, timeout_s=2)
        plan = make_plan(1438, 64, 16, 1)
        split_dir, manifest, remote = open_location(f"{server.url}/digits/train", cache, 0)
        loader = build_train_loader(split_dir, plan, 0, 0, SHARDS, None, manifest, remote=remote)
        batches = loader.epoch(0)
        next(batches)
        server.stop()
        with pytest.raises(DataError) as err:
            for _ in batches:  # the cache holds half the shards: some must be fetched
                pass
    finally:
        server.stop()
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{server.url}/digits/train/")
    assert "unreachable for 2 s (data.remote.timeout_s" in message


@pytest.mark.slow
def test_training_from_http_then_a_failing_store_exits_2_and_keeps_the_checkpoint(
    nginx: Nginx, tmp_path: Path
) -> None:
    """`python -m ddp.train data.root=http://...` trains from nginx (each shard fetched
    once); a resume whose shards then keep failing (503) ends with one line naming the
    URL, exit 2, the checkpoint as it was. (Processes sharing the cache: see above.)"""
    before = len(nginx.requests(".tar"))
    remote = [f"data.remote.cache_dir={tmp_path / 'cache'}", "data.loader.in_memory_max_mb=0"]
    first = smoke_overrides(f"{nginx.url}/digits", tmp_path / "runs", "test", *remote)
    audit = ["trainer.max_epochs=1", "trainer.audit_samples=true"]
    out = harness.train([*first, *audit], nproc=0, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    fetched = Counter(nginx.requests(".tar")[before:])
    assert len(fetched) == 8 and set(fetched.values()) == {1}  # 6 train + 2 val shards
    run_dir = tmp_path / "runs" / "test"
    checkpoint = (run_dir / "checkpoints" / "last.pt").read_bytes()
    (val,) = records(run_dir, "val")
    assert val["audit/unique_samples"] == 1438 and val["audit/missing_samples"] == 0

    failing = smoke_overrides(f"{nginx.url}/failing/digits", tmp_path / "runs", "test", *remote)
    out = harness.train(
        [*failing, "trainer.max_epochs=2", "data.remote.timeout_s=2"], nproc=0, timeout=180
    )
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if "unreachable for 2 s" in line]
    assert lines and all(f"{nginx.url}/failing/digits/" in line for line in lines)
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == checkpoint


def test_dataloader_workers_read_a_remote_split_as_the_main_process(
    nginx: Nginx, digits_root: Path, tmp_path: Path
) -> None:
    """Workers (forked, persistent) fetch and pin through the same cache: same batches."""
    plan = make_plan(1438, 64, 16, 2)
    options = loader_options(num_workers=2, in_memory_max_mb=0)
    cache = cache_in(tmp_path / "cache")
    split_dir, manifest, remote = open_location(f"{nginx.url}/digits/train", cache)
    loader = build_train_loader(split_dir, plan, 1, 0, options, None, manifest, remote=remote)
    try:
        for epoch in (0, 1):
            local = local_epoch(digits_root / "train", plan, rank=1, epoch=epoch)
            assert same(list(loader.epoch(epoch)), local)
    finally:
        loader.close()


def test_a_missing_s3_key_is_named(moto_s3: str, tmp_path: Path) -> None:
    cache = cache_in(tmp_path / "cache", endpoint=moto_s3)
    with pytest.raises(DataError, match=r"^s3://data/nowhere/train/manifest.json: S3 NoSuchKey"):
        open_location("s3://data/nowhere/train", cache)


def test_a_download_left_by_a_dead_process_is_removed_not_counted(tmp_path: Path) -> None:
    cache = cache_in(tmp_path / "cache")
    split = cache.split_dir("http://host/data/train")
    split.mkdir(parents=True)
    for name in ("live", "dead"):
        with open(split / f"{name}.tar.part", "wb") as f:
            f.truncate(1000)
        (split / f"{name}.tar.download").touch()
    with open(split / "live.tar.download", "rb") as live:
        fcntl.flock(live, fcntl.LOCK_EX)  # a download in flight (another open file: as a process)
        assert cache.used_bytes() == 1000
    assert (split / "live.tar.part").exists() and not (split / "dead.tar.part").exists()


def test_a_location_of_another_scheme_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^gs://bucket/digits/train: gs:// is not read"):
        open_location("gs://bucket/digits/train", cache_in(tmp_path / "cache"))


def test_a_broken_transfer_resumes_where_it_stopped(
    breaking_server: BreakingServer, digits_root: Path, tmp_path: Path
) -> None:
    """Every file's first transfer breaks halfway: each shard is resumed by a Range
    request (not fetched again from its start), verified, and the epoch is the local
    one; the manifest and index files are read again whole."""
    cache = cache_in(tmp_path / "cache")
    plan = make_plan(1438, 64, 16, 1)
    batches = remote_epoch(f"{breaking_server.url}/digits/train", cache, plan)
    assert same(batches, local_epoch(digits_root / "train", plan))
    per_shard: dict[str, list] = {}
    for path, ranged in breaking_server.requests:
        if path.endswith(".tar"):
            per_shard.setdefault(path, []).append(ranged)
    assert len(per_shard) == 6
    for ranges in per_shard.values():  # whole, then from where it broke
        assert len(ranges) == 2 and ranges[0] is None and ranges[1] != "bytes=0-"
    others = [(p, r) for p, r in breaking_server.requests if not p.endswith(".tar")]
    assert others and all(r is None for _, r in others)
    assert Counter(p for p, _ in others) == {p: 2 for p, _ in others}


def test_a_remote_split_held_in_memory_gives_the_same_batches(
    nginx: Nginx, digits_root: Path, tmp_path: Path
) -> None:
    plan = make_plan(1438, 64, 16, 2)
    memory = loader_options()  # digits fits in in_memory_max_mb: decoded once, at start-up
    batches = remote_epoch(
        f"{nginx.url}/digits/train", cache_in(tmp_path / "cache"), plan, 1, 2, options=memory
    )
    assert same(batches, local_epoch(digits_root / "train", plan, rank=1, epoch=2))


def first_needs(plan, rank: int, epoch: int, shard_of) -> dict[int, int]:
    """shard -> the position of the first micro-batch that needs it, in that order."""
    first: dict[int, int] = {}
    for position, micro in enumerate(rank_micro_batches(plan, 0, epoch, rank)):
        for shard in np.unique(shard_of(np.asarray(micro.indices))).tolist():
            first.setdefault(shard, position)
    return first


def fetched_up_to(prefetcher: Prefetcher, count: int, timeout: float = 60) -> None:
    """Wait for the prefetch thread to have fetched `count` shards (not timing it)."""
    deadline = time.monotonic() + timeout
    while len(prefetcher.fetched) < count:
        assert time.monotonic() < deadline, f"{prefetcher.fetched} after {timeout} s"
        time.sleep(0.01)


def test_prefetch_follows_the_epoch_order_and_stays_within_its_window(
    nginx: Nginx, tmp_path: Path
) -> None:
    plan = make_plan(1438, 8, 4, 2)  # 4-sample micro-batches: a few shards each
    shard_of = SplitIndex.from_manifest(read_manifest(Path(nginx.root) / "digits/train")).shard_of
    first = first_needs(plan, 1, 5, shard_of)
    expected = list(first)
    url = f"{nginx.url}/digits/train"

    _, _, split = open_location(url, cache_in(tmp_path / "all"))
    everything = Prefetcher(split, shard_of, rank_micro_batches(plan, 0, 5, 1), 100).start()
    everything._thread.join()  # it ends by itself once every shard is in
    assert everything.fetched == expected and split.cache.downloads == 6

    _, _, split = open_location(url, cache_in(tmp_path / "two"))
    allowed = 2
    assert allowed < len(everything.fetched)  # a window smaller than what the split needs
    window = Prefetcher(split, shard_of, rank_micro_batches(plan, 0, 5, 1), allowed).start()
    # The consumer has read nothing yet: 2 shards, those micro-batch 0 needs first.
    fetched_up_to(window, allowed)
    assert window.fetched == expected[:allowed] and split.cache.downloads == allowed
    # Micro-batch 0 read: the shards it needed leave the window, as many more come in.
    window.consumed(1)
    moved = min(len(expected), allowed + sum(position < 1 for position in first.values()))
    assert moved < len(expected)  # the window still holds the rest back
    fetched_up_to(window, moved)
    window.stop()
    assert window.fetched == expected[:moved] and split.cache.downloads == moved

    # Shards the reader holds pinned are in the cache until it lets go: not fetched, and
    # not counted in the window (a warm epoch of a long-lived loader fetches nothing).
    _, _, split = open_location(url, cache_in(tmp_path / "held"))
    held = set(expected[:3])
    rest = Prefetcher(split, shard_of, rank_micro_batches(plan, 0, 5, 1), 100, held.__contains__)
    rest.start()._thread.join()
    assert rest.fetched == expected[3:] and split.cache.downloads == 3


def test_a_loader_holds_the_remote_shards_it_reads(nginx: Nginx, tmp_path: Path) -> None:
    """What the prefetcher asks before fetching: after an epoch through a cache that
    holds the split, the reader holds every shard; through a cache of two, at most two."""
    plan = make_plan(1438, 64, 16, 1)
    for max_bytes, most in ((GB, 6), (2 * DIGITS_SHARD, 1)):
        cache = cache_in(tmp_path / f"cache-{most}", max_bytes)
        split_dir, manifest, remote = open_location(f"{nginx.url}/digits/train", cache, 0)
        loader = build_train_loader(split_dir, plan, 0, 0, SHARDS, None, manifest, remote=remote)
        try:
            for _ in loader.epoch(0):
                assert sum(map(loader.dataset.holds, range(6))) <= most
            assert sum(map(loader.dataset.holds, range(6))) == most
        finally:
            loader.close()


def test_a_cache_too_small_for_the_shards_in_use_is_named(
    nginx: Nginx, digits_root: Path, tmp_path: Path
) -> None:
    """One shard fits; while a process has it open, another cannot come in: the fetch
    waits for the timeout, then names the bound. The pinned shard is left alone."""
    cache = cache_in(tmp_path / "cache", full_shard(digits_root), timeout_s=1)
    _, _, split = open_location(f"{nginx.url}/digits/train", cache)
    pin = split.pin(0)
    try:
        with pytest.raises(DataError, match=r"data.remote.cache_max_gb=[0-9.e-]+ is too small"):
            split.fetch(1)
        assert split.path(0).is_file() and not split.path(1).exists()
    finally:
        split.unpin(pin)
    split.fetch(1)  # unpinned, shard 0 makes room
    assert not split.path(0).exists() and cache.used_bytes() <= DIGITS_SHARD


def test_a_restart_fetches_again_a_cached_shard_that_no_longer_matches(
    nginx: Nginx, tmp_path: Path
) -> None:
    """A cached shard cut short (a full disk, a hand) or verified against another
    manifest's checksum is not used: it is fetched again, the rest reused."""
    plan = make_plan(1438, 64, 16, 1)
    url = f"{nginx.url}/digits/train"
    first = remote_epoch(url, cache_in(tmp_path / "cache"), plan)
    split_dir = cache_in(tmp_path / "cache").split_dir(url)
    with open(split_dir / "shard-000002.tar", "r+b") as f:
        f.truncate(1000)
    (split_dir / "shard-000004.tar.ok").write_text("0" * 64)
    again = cache_in(tmp_path / "cache")
    assert same(remote_epoch(url, again, plan), first)
    assert again.downloads == 2
