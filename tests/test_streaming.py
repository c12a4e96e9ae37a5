"""Guarantees of streaming mode (ddp.data.streaming): exactly equal micro-batch counts on
every rank whatever the shards and workers, full coverage when counts divide,
determinism per (seed, epoch), and clear errors naming a missing shard."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from ddp.data.batch import Batch
from ddp.data.splits import stream_num_samples
from ddp.data.stream_shards import stream_share
from ddp.data.streaming import build_stream_loader
from ddp.errors import DataError
from ddp.plan import make_plan
from tests.configs import loader_options
from tests.fixtures import write_split


def run_epoch(urls, plan, rank=0, epoch=0, start_step=0, seed=0, workers=0, buffer=16, **kw):
    options = loader_options(num_workers=workers, **kw)
    loader = build_stream_loader(urls, plan, rank, seed, options, shuffle_buffer=buffer)
    batches = list(loader.epoch(epoch, start_step))
    loader.close()
    return batches, loader


def ids(batches: list[Batch]) -> list[int]:
    return [int(i) for b in batches for i in b.indices]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("split", ["uneven", "few"])
def test_equal_micro_batch_counts_on_every_rank(stream_splits, split: str, workers: int) -> None:
    paths = [str(p) for p in stream_splits[split]]
    n = stream_num_samples(paths)
    for world in range(1, 5):
        plan = make_plan(n, 3 * world * 2, 3, world)
        read = 0
        for rank in range(world):
            batches, loader = run_epoch(paths, plan, rank, workers=workers)
            assert len(batches) == plan.micro_batches_per_epoch
            assert all(b.inputs.shape == (3, 1, 2, 2) and b.valid.all() for b in batches)
            # Samples are what they claim to be: input value == manifest index.
            assert all(torch.equal(b.inputs[:, 0, 0, 0].long(), b.indices) for b in batches)
            assert loader.samples_read + loader.repeats == plan.micro_batches_per_epoch * 3
            read += loader.samples_read + loader.dropped
        assert read == n  # every sample is read once, or reported dropped


@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_once_per_epoch_when_counts_divide(stream_splits, workers: int) -> None:
    paths = stream_splits["even"]
    plan = make_plan(96, 24, 4, 2)  # 4 iterations x 6 micro-batches of 4 on each rank
    for epoch in range(2):
        seen: Counter = Counter()
        for rank in range(2):
            batches, loader = run_epoch(paths, plan, rank, epoch, workers=workers)
            assert loader.repeats == loader.dropped == 0
            seen.update(ids(batches))
        assert sorted(seen) == list(range(96)) and set(seen.values()) == {1}


def test_epoch_counts_are_ready_at_the_last_batch(stream_splits) -> None:
    """The trainer takes exactly its micro-batches and never exhausts the generator."""
    plan = make_plan(102, 12, 3, 2)
    loader = build_stream_loader(stream_splits["uneven"], plan, 0, 0, loader_options(num_workers=2))
    batches = loader.epoch(0)
    for _ in range(plan.micro_batches_per_epoch):
        next(batches)
    assert loader.dropped is not None and loader.rank_samples(0) is not None
    assert loader.samples_read + loader.dropped == loader.rank_samples(0)
    loader.close()


def test_deterministic_per_seed_and_epoch(stream_splits) -> None:
    paths = stream_splits["even"]
    plan = make_plan(96, 24, 4, 2)
    first = ids(run_epoch(paths, plan, 1, epoch=3, seed=7, workers=2)[0])
    assert ids(run_epoch(paths, plan, 1, epoch=3, seed=7, workers=2)[0]) == first
    assert ids(run_epoch(paths, plan, 1, epoch=4, seed=7, workers=2)[0]) != first
    assert ids(run_epoch(paths, plan, 1, epoch=3, seed=8, workers=2)[0]) != first


def test_persistent_workers_follow_the_epoch(stream_splits) -> None:
    paths = stream_splits["uneven"]
    plan = make_plan(102, 12, 3, 2)
    options = loader_options(num_workers=2, persistent_workers=True)
    loader = build_stream_loader(paths, plan, 1, 0, options, shuffle_buffer=16)
    epochs = [ids(loader.epoch(e)) for e in (0, 1, 0)]
    loader.close()
    assert epochs[0] == epochs[2] != epochs[1]
    assert epochs[1] == ids(run_epoch(paths, plan, 1, epoch=1, workers=2)[0])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_reads_up_to_the_step(stream_splits, workers: int) -> None:
    paths = stream_splits["uneven"]
    plan = make_plan(102, 12, 3, 2)  # 9 iterations x 2 micro-batches per rank
    full, _ = run_epoch(paths, plan, 1, epoch=2, workers=workers)
    tail, _ = run_epoch(paths, plan, 1, epoch=2, start_step=5, workers=workers)
    assert len(tail) == (plan.iterations_per_epoch - 5) * plan.accumulate
    assert all(torch.equal(a.inputs, b.inputs) for a, b in zip(full[10:], tail, strict=True))


def test_pipe_brace_pattern_and_file_urls_read_like_paths(stream_splits) -> None:
    paths = stream_splits["even"]
    folder = paths[0].parent
    plan = make_plan(96, 24, 4, 2)
    expected = ids(run_epoch([str(p) for p in paths], plan, 1, epoch=1)[0])
    pattern = f"pipe:cat {folder}/shard-{{000000..000007}}.tar"
    assert ids(run_epoch(pattern, plan, 1, epoch=1)[0]) == expected
    assert ids(run_epoch([p.as_uri() for p in paths], plan, 1, epoch=1)[0]) == expected


def test_without_a_manifest_counts_stay_exact(stream_splits) -> None:
    """Shards behind a command the loader cannot see through: no indices, no
    `dropped`, but the same micro-batch count and the same samples."""
    paths = stream_splits["uneven"]
    plan = make_plan(102, 12, 3, 2)
    urls = [f"pipe:cat < {p}" for p in paths]
    batches, loader = run_epoch(urls, plan, 0, workers=2)
    assert len(batches) == plan.micro_batches_per_epoch and loader.dropped is None
    assert all((b.indices == -1).all() for b in batches)
    known, _ = run_epoch(paths, plan, 0, workers=2)
    assert all(torch.equal(a.inputs, b.inputs) for a, b in zip(batches, known, strict=True))


def test_missing_shard_raises_naming_it(stream_splits, tmp_path: Path) -> None:
    paths = [str(p) for p in stream_splits["even"]]
    plan = make_plan(96, 24, 4, 2)
    missing = str(tmp_path / "gone-000009.tar")
    with pytest.raises(DataError, match="gone-000009.tar: shard missing"):
        build_stream_loader([*paths, missing], plan, 0, 0, loader_options())
    for workers in (0, 2):
        urls = [f"pipe:cat {missing}"] * 8
        with pytest.raises(DataError, match=f"pipe:cat {missing}: unreadable shard"):
            run_epoch(urls, plan, 0, workers=workers)


def test_a_manifest_that_disagrees_with_the_plan_is_refused(stream_splits) -> None:
    with pytest.raises(DataError, match="the plan is for 90 samples"):
        build_stream_loader(stream_splits["even"], make_plan(90, 24, 4, 2), 0, 0, loader_options())


def test_bad_samples_are_raised_or_skipped_with_exact_counts(tmp_path: Path) -> None:
    paths = write_split(tmp_path / "bad", (20, 20))
    with tarfile.open(paths[0], "a", format=tarfile.USTAR_FORMAT) as tar:
        for ext, data in (("cls", b"3"), ("npy", b"not an array")):
            info = tarfile.TarInfo(f"zbroken.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    urls = [f"pipe:cat < {p}" for p in paths]  # no manifest: 41 samples as declared
    plan = make_plan(41, 8, 4, 1)
    with pytest.raises(DataError, match="key zbroken: ValueError"):
        run_epoch(urls, plan)
    batches, loader = run_epoch(urls, plan, on_error="skip")
    assert len(batches) == plan.micro_batches_per_epoch and loader.num_skipped >= 1


def test_shards_go_to_one_rank_and_worker_each() -> None:
    for world, workers in ((1, 1), (2, 2), (3, 2), (4, 1)):
        got = Counter()
        for rank in range(world):
            rank_shards = set()
            for worker in range(workers):
                share = stream_share(12, 5, 1, rank, world, worker, workers)
                assert share.rank_modulo is None and share.worker_modulo is None
                got.update(share.shards)
                rank_shards.update(share.shards)
            # A rank reads the same shards whatever its worker count.
            alone = stream_share(12, 5, 1, rank, world, 0, 1).shards
            assert rank_shards == set(alone)
        assert sorted(got) == list(range(12)) and set(got.values()) == {1}
    # Fewer shards than ranks: every rank reads them all and keeps every 3rd sample.
    share = stream_share(2, 5, 1, 2, 3, 0, 1)
    assert share.rank_modulo == (2, 3) and share.num_samples([40, 23]) == 21


@pytest.mark.parametrize("fmt", ["pax", "gnu", "gz"])
def test_tars_from_other_tools_with_long_names(tmp_path: Path, fmt: str) -> None:
    """pax and GNU long-name headers, and a gzipped tar, read like ours."""
    formats = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "gz": tarfile.PAX_FORMAT}
    path = tmp_path / ("long.tar.gz" if fmt == "gz" else "long.tar")
    with tarfile.open(path, "w:gz" if fmt == "gz" else "w", format=formats[fmt]) as tar:
        for i in range(6):
            npy = io.BytesIO()
            np.save(npy, np.full((1, 2, 2), i, dtype=np.float32))
            for ext, data in (("cls", str(i).encode()), ("npy", npy.getvalue())):
                info = tarfile.TarInfo(f"{'d' * 120}/s{i:03d}-{'é' * 40}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    batches, _ = run_epoch([str(path)], make_plan(6, 2, 2, 1), buffer=0)
    assert [int(t) for b in batches for t in b.targets] == list(range(6))
    assert [int(x) for b in batches for x in b.inputs[:, 0, 0, 0]] == list(range(6))
