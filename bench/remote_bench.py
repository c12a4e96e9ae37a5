"""Remote splits: the indexed loader from nginx and from an S3 server, cold and warm
cache, against the same shards on local disk and webdataset's streaming of the same
URLs, in one call.

    python bench/remote_bench.py [--num-samples 20000] [--data /tmp/ddp-remote-bench]

Needs nginx (Debian's nginx-light) and the test extra (boto3, moto[server]). Servers run
on 127.0.0.1 (loopback: this measures the software, not a network). Rows, one process,
num_workers=0, micro-batches of 256, exact epoch order, the split read from the shards
(in_memory_max_mb=0):
- http/s3 cold: a fresh cache: every shard fetched (and sha256-checked) during the epoch;
- local disk, http/s3 warm, in turns (best of 5): three epochs of a loader built
  beforehand (the first maps the shards), from the split on local disk and, as after a
  restart, over the filled cache (only the manifest is fetched; that set-up time is
  printed apart); the warm/local ratio of each turn is printed too;
- webdataset http: `wds.WebDataset(urls)` streaming the same shards from nginx, decoding
  the same npy and cls members, batched by 256 (no shuffle: its best case);
- http, cache = half the split: an epoch after the first through a cache bounded to
  half the shards' bytes (a random order needs every shard in every epoch: shards are
  evicted and fetched again);
- resume at 90% (cold): time to the first batch at 90% of an epoch over the time to the
  first batch at its start, each from a fresh cache.
Bytes fetched per epoch: what the loader read from the server (shards, manifest, index).

Then the shard-window order (data.window_shards) against the full shuffle, with the
cache bounded to half the split: bytes an epoch after the first fetches from nginx and
its samples/s (what locality buys), and what it costs in randomness, from the order
itself: shards and classes per global batch of 256, when the shards hold shuffled
samples (as `ddp-shards prepare` writes them) and when they are sorted by class (as a
folder of class folders written in order would be), and how often consecutive samples
share a shard.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import webdataset as wds
from results import write
from servers import S3_ENV, Nginx, ServerUnavailable, free_port, wait_for_port

from ddp.data.batch import PLAIN, LoaderOptions
from ddp.data.cache import GB, ShardCache
from ddp.data.loaders import build_train_loader
from ddp.data.remote import Remote
from ddp.data.splits import open_location
from ddp.order import ShardWindows, order_for
from ddp.plan import make_plan
from ddp.shards import read_manifest
from ddp.shards.prepare import prepare_synthetic

SHAPE = (32, 32, 3)
MICRO = 256
WARM_EPOCHS = (0, 1, 2)
"""Epochs timed together against local disk (one is ~40 ms here: too short alone)."""
OPTIONS = LoaderOptions(replace(PLAIN, in_memory_max_mb=0))


def prepare(root: Path, count: int) -> Path:
    split = root / f"synth-{count}" / "train"
    if not (split / "manifest.json").exists():
        prepare_synthetic(split.parent, count, SHAPE, 10, seed=0, shard_size=1000, val_fraction=0)
    return split


def epoch_rate(split_dir, manifest, remote, num: int, epochs: Sequence[int] = (0,)) -> float:
    """Samples/s of `epochs` of one loader built beforehand (set-up not counted; the first
    epoch maps the shards, as after a restart)."""
    plan = make_plan(num, MICRO, MICRO, 1)
    loader = build_train_loader(split_dir, plan, 0, 0, OPTIONS, None, manifest, remote=remote)
    start = time.perf_counter()
    seen = sum(len(b.indices) for epoch in epochs for b in loader.epoch(epoch))
    elapsed = time.perf_counter() - start
    loader.close()
    assert seen >= num * len(epochs)
    return num * len(epochs) / elapsed


def cold_rate(url: str, cache_dir: Path, num: int, endpoint: str | None) -> tuple[float, int]:
    """An epoch through a fresh cache (every shard fetched), and the bytes it fetched."""
    remote = Remote(timeout_s=30, s3_endpoint=endpoint)
    split_dir, manifest, split = open_location(url, ShardCache(cache_dir, GB, remote))
    return epoch_rate(split_dir, manifest, split, num), remote.bytes_fetched


def warm_rate(url: str, cache_dir: Path, num: int, endpoint: str | None) -> tuple[float, float]:
    """A restart over a filled cache (a new cache object over the same directory): the
    samples/s of WARM_EPOCHS and the set-up (the manifest fetched, the split opened)."""
    again = ShardCache(cache_dir, GB, Remote(timeout_s=30, s3_endpoint=endpoint))
    start = time.perf_counter()
    split_dir, manifest, split = open_location(url, again)
    setup = time.perf_counter() - start
    rate = epoch_rate(split_dir, manifest, split, num, WARM_EPOCHS)
    assert again.downloads == 0
    return rate, setup


def bounded_rate(
    url: str, cache_dir: Path, num: int, max_bytes: int, window_shards: int | None = None
) -> tuple[float, int]:
    """The second epoch through a cache that holds half the split (the first fills it):
    samples/s and the bytes that epoch fetched."""
    remote = Remote(timeout_s=30)
    cache = ShardCache(cache_dir, max_bytes, remote)
    split_dir, manifest, split = open_location(url, cache)
    plan = make_plan(num, MICRO, MICRO, 1)
    options = replace(OPTIONS, window_shards=window_shards)
    loader = build_train_loader(split_dir, plan, 0, 0, options, None, manifest, remote=split)
    sum(len(b.indices) for b in loader.epoch(0))
    before = remote.bytes_fetched
    start = time.perf_counter()
    seen = sum(len(b.indices) for b in loader.epoch(1))
    elapsed = time.perf_counter() - start
    loader.close()
    assert cache.used_bytes() <= max_bytes
    return seen / elapsed, remote.bytes_fetched - before


def randomness(counts: np.ndarray, labels: np.ndarray, window_shards: int | None) -> dict:
    """Of epoch 1's order: mean distinct shards and classes per global batch of MICRO, and
    the fraction of consecutive samples from one shard."""
    num = int(counts.sum())
    order = order_for(num, 0, 1, ShardWindows.of(counts, window_shards))(np.arange(num))
    shard = np.searchsorted(np.cumsum(counts), order, side="right")
    batches = range(0, num - MICRO + 1, MICRO)
    return {
        "shards": np.mean([len(np.unique(shard[b : b + MICRO])) for b in batches]),
        "classes": np.mean([len(np.unique(labels[order[b : b + MICRO]])) for b in batches]),
        "same shard": float(np.mean(shard[1:] == shard[:-1])),
    }


def window_rows(url: str, work: Path, manifest, size: int) -> list[tuple]:
    """Per order: samples/s and MB an epoch after the first fetches with a cache of half
    the split, then the randomness of the order (shuffled shards, class-sorted shards)."""
    num, counts = manifest.num_samples, manifest.table.counts
    shuffled = manifest.samples.labels["cls"]
    classes = int(shuffled.max()) + 1
    by_class = np.arange(num) * classes // num  # the same classes, written in order
    rows = []
    for k in (None, 8, 4, 2, 1):
        rate, fetched = bounded_rate(url, work / f"cache-w{k}", num, size // 2, k)
        mixed, sorted_ = randomness(counts, shuffled, k), randomness(counts, by_class, k)
        rows.append((k, rate, fetched, mixed, sorted_["classes"]))
    return rows


def first_batch_s(url: str, cache_dir: Path, num: int, start_step: int) -> float:
    cache = ShardCache(cache_dir, GB, Remote(timeout_s=30))
    start = time.perf_counter()
    split_dir, manifest, split = open_location(url, cache)
    plan = make_plan(num, MICRO, MICRO, 1)
    loader = build_train_loader(split_dir, plan, 0, 0, OPTIONS, None, manifest, remote=split)
    next(iter(loader.epoch(0, start_step)))
    elapsed = time.perf_counter() - start
    loader.close()
    return elapsed


def webdataset_rate(urls: list[str], num: int) -> float:
    def npy(data: bytes) -> np.ndarray:
        return np.load(io.BytesIO(data))

    start = time.perf_counter()
    dataset = (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        .decode(wds.handle_extension("npy", npy), wds.handle_extension("cls", int))
        .to_tuple("npy", "cls")
        .batched(MICRO)
    )
    seen = sum(len(batch[1]) for batch in dataset)
    assert seen == num, seen
    return num / (time.perf_counter() - start)


def nginx_bytes(server: Nginx) -> int:
    total = 0
    for line in server.log.read_text().splitlines():
        fields = line.split('"')
        if len(fields) > 2:
            status_bytes = fields[2].split()
            if len(status_bytes) == 2 and status_bytes[1].isdigit():
                total += int(status_bytes[1])
    return total


def best(repeats: int, rate: Callable[[], float]) -> float:
    return max(rate() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=20_000)
    parser.add_argument("--data", type=Path, default=Path("/tmp/ddp-remote-bench"))
    parser.add_argument("--json", type=Path, help="the results file (default: bench/results/)")
    args = parser.parse_args()
    split = prepare(args.data, args.num_samples)
    manifest = read_manifest(split)
    num = manifest.num_samples
    names = manifest.table.names
    size = int(manifest.table.sizes.sum())
    print(f"{num:,} samples of {SHAPE} uint8 npy in {len(names)} shards, {size / 1e6:.1f} MB")

    work = Path(tempfile.mkdtemp(prefix="remote-bench-"))
    try:
        server = Nginx(args.data, work / "nginx")
    except ServerUnavailable as err:
        shutil.rmtree(work, ignore_errors=True)
        raise SystemExit(f"remote_bench: {err}") from None
    os.environ.update(S3_ENV)
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request

    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_for_port(port)
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="bench")
        for path in split.iterdir():
            client.upload_file(str(path), "bench", f"synth/train/{path.name}")

        http_url = f"{server.url}/{split.parent.name}/train"
        s3_url = "s3://bench/synth/train"
        rows: dict[str, float] = {}
        rows["http cold"], http_bytes = cold_rate(http_url, work / "cache-http", num, None)
        rows["s3 cold"], s3_bytes = cold_rate(s3_url, work / "cache-s3", num, endpoint)
        # Local disk and the warm caches in turns, best of 5 (a shared machine's noise).
        turns: dict[str, list[float]] = {"local disk": [], "http warm": [], "s3 warm": []}
        setups: dict[str, list[float]] = {"http": [], "s3": []}
        for _ in range(5):
            turns["local disk"].append(epoch_rate(split, manifest, None, num, WARM_EPOCHS))
            for scheme, url, end in (("http", http_url, None), ("s3", s3_url, endpoint)):
                rate, setup = warm_rate(url, work / f"cache-{scheme}", num, end)
                turns[f"{scheme} warm"].append(rate)
                setups[scheme].append(setup)
        rows.update({name: max(rates) for name, rates in turns.items()})
        before = nginx_bytes(server)
        urls = [f"{http_url}/{name}" for name in names]
        rows["webdataset http"] = best(2, lambda: webdataset_rate(urls, num))
        wds_bytes = (nginx_bytes(server) - before) / 2
        iterations = -(-num // MICRO)
        # Each from a fresh cache, in turns, best of 3 (a cold fetch of the split varies
        # 2x here, with the machine's dirty pages).
        firsts: dict[int, list[float]] = {0: [], int(0.9 * iterations): []}
        for i in range(3):
            for step, times in firsts.items():
                times.append(first_batch_s(http_url, work / f"cache-r{step}-{i}", num, step))
                shutil.rmtree(work / f"cache-r{step}-{i}")
        at_start, at_90 = (min(times) for times in firsts.values())
        rows["http, cache = half the split"], half_bytes = bounded_rate(
            http_url, work / "cache-half", num, size // 2
        )
        windows = window_rows(http_url, work, manifest, size)
    finally:
        moto.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)  # the caches: hundreds of MB

    local = rows["local disk"]
    order = ["local disk", "http cold", "http warm", "s3 cold", "s3 warm", "webdataset http"]
    print("\n| loader | samples/s | vs local disk |\n| --- | ---: | ---: |")
    for name in [*order, *(name for name in rows if name not in order)]:
        print(f"| {name} | {rows[name]:,.0f} | {rows[name] / local:.2f}x |")
    for scheme in ("http", "s3"):
        ratios = np.divide(turns[f"{scheme} warm"], turns["local disk"])
        print(
            f"{scheme} warm / local disk, turn by turn ({len(ratios)} turns of "
            f"{len(WARM_EPOCHS)} epochs): median {np.median(ratios):.2f}x, "
            f"{ratios.min():.2f}-{ratios.max():.2f}x"
        )
    print(
        f"\nbytes fetched per epoch: ddp http {http_bytes / 1e6:.1f} MB, ddp s3 "
        f"{s3_bytes / 1e6:.1f} MB (cold; warm: the manifest only), webdataset "
        f"{wds_bytes / 1e6:.1f} MB; ddp http with a cache of half the split "
        f"{half_bytes / 1e6:.1f} MB (an epoch after the first); the shards hold "
        f"{size / 1e6:.1f} MB"
    )
    print(
        f"set-up of a warm remote split (manifest fetched, split opened): http "
        f"{min(setups['http']) * 1e3:.0f} ms, s3 {min(setups['s3']) * 1e3:.0f} ms"
    )
    print(
        f"time to the first batch, cold cache: at the epoch's start {at_start:.2f} s, "
        f"at 90% {at_90:.2f} s ({at_90 / at_start:.2f}x)"
    )
    print(
        f"\nThe shard-window order, cache = half the split ({len(names)} shards of "
        f"{num // len(names):,}; global batch {MICRO}; an epoch after the first):\n"
        "| data.window_shards | samples/s | MB fetched per epoch | vs the split | shards per "
        "batch | classes per batch (shards shuffled) | classes per batch (shards by class) "
        "| consecutive samples from one shard |\n| --- | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: |"
    )
    for k, rate, fetched, mixed, by_class in windows:
        print(
            f"| {'null (full shuffle)' if k is None else k} | {rate:,.0f} | {fetched / 1e6:.1f} "
            f"| {fetched / size:.2f}x | {mixed['shards']:.1f} | {mixed['classes']:.1f} "
            f"| {by_class:.1f} | {mixed['same shard']:.3f} |"
        )
    numbers = {
        "split": {"samples": num, "shards": len(names), "bytes": size, "micro_batch": MICRO},
        "samples_per_s": rows,
        "warm_over_local_by_turn": {
            scheme: np.divide(turns[f"{scheme} warm"], turns["local disk"]).tolist()
            for scheme in ("http", "s3")
        },
        "bytes_per_epoch": {
            "ddp http cold": http_bytes,
            "ddp s3 cold": s3_bytes,
            "webdataset http": wds_bytes,
            "ddp http, cache = half the split": half_bytes,
        },
        "warm_set_up_s": {scheme: min(times) for scheme, times in setups.items()},
        "first_batch_cold_s": {"at start": at_start, "at 90%": at_90},
        "window_shards": [
            {
                "window_shards": k,
                "samples_per_s": rate,
                "bytes_per_epoch": fetched,
                "shuffled shards": mixed,
                "classes per batch, shards by class": by_class,
            }
            for k, rate, fetched, mixed, by_class in windows
        ],  # fmt: skip
    }
    write("remote", numbers, args.json)


if __name__ == "__main__":
    main()
