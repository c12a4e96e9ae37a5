"""Guarantees of the indexed loader (ddp.data.loaders): exact epochs, resumable, worker-independent,
and clear errors on bad data."""

from __future__ import annotations

import pickle
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from ddp.data.batch import Batch
from ddp.data.dataset import ShardDataset
from ddp.data.device import InputPipeline
from ddp.data.loaders import build_eval_loader, build_train_loader
from ddp.errors import DataError
from ddp.plan import make_plan
from ddp.shards import index_split, read_manifest
from ddp.shards.prepare import prepare_synthetic
from tests import harness
from tests.configs import loader_options
from tests.fixtures import as_v1, copy_split, corrupt_npy


def epoch_batches(
    split: Path, plan, rank: int = 0, epoch: int = 0, start_step: int = 0, **options
) -> list[Batch]:
    loader = build_train_loader(split, plan, rank, seed=0, options=loader_options(**options))
    return list(loader.epoch(epoch, start_step))


def same(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.indices, y.indices)
        and torch.equal(x.inputs, y.inputs)
        and torch.equal(x.targets, y.targets)
        and torch.equal(x.valid, y.valid)
        and x.num_skipped == y.num_skipped
        for x, y in zip(a, b, strict=True)
    )


SHARDS = {"in_memory_max_mb": 0}
"""Loader options that read every micro-batch from the shards (digits fits in memory)."""


def test_num_samples_comes_from_the_manifest(digits_root: Path) -> None:
    assert read_manifest(digits_root / "train").num_samples == 1438
    assert read_manifest(digits_root / "val").num_samples == 359


@pytest.mark.parametrize("options", [SHARDS, {}], ids=["shards", "memory"])
def test_every_sample_once_per_epoch_across_ranks(digits_root: Path, options) -> None:
    plan = make_plan(1438, 96, 16, 3)
    seen: Counter = Counter()
    for rank in range(3):
        batches = epoch_batches(digits_root / "train", plan, rank, **options)
        assert len(batches) == plan.micro_batches_per_epoch
        for b in batches:
            seen.update(b.indices[b.valid].tolist())
            assert b.inputs.shape == (16, 1, 8, 8) and b.inputs.dtype == torch.float32
            assert b.targets.dtype == torch.int64 and b.valid.dtype == torch.bool
    assert sorted(seen) == list(range(1438)) and set(seen.values()) == {1}


def test_loader_returns_the_stored_samples(digits_root: Path) -> None:
    dataset = ShardDataset(digits_root / "val")
    manifest = read_manifest(digits_root / "val")
    shard = manifest.shards[0]
    import tarfile

    with tarfile.open(digits_root / "val" / shard.name) as tar:
        raw = tar.extractfile(f"{shard.keys[2]}.npy").read()
        label = int(tar.extractfile(f"{shard.keys[2]}.cls").read())
    expected = np.frombuffer(raw[-64 * 4 :], dtype=np.float32).reshape(1, 8, 8)
    image, target = dataset[2]
    assert torch.equal(image, torch.from_numpy(expected.copy())) and target == label


def test_loader_is_identical_for_0_and_2_workers(digits_root: Path) -> None:
    plan = make_plan(1438, 64, 16, 2)
    serial = build_train_loader(
        digits_root / "train", plan, 1, 0, loader_options(num_workers=0, **SHARDS)
    )
    workers = build_train_loader(
        digits_root / "train", plan, 1, 0, loader_options(num_workers=2, **SHARDS)
    )
    for epoch in (0, 1):  # persistent workers must see the new epoch
        assert same(list(serial.epoch(epoch)), list(workers.epoch(epoch)))
    assert same(list(serial.epoch(2, 5)), list(workers.epoch(2, 5)))
    assert not same(list(serial.epoch(0)), list(serial.epoch(1)))


@pytest.mark.parametrize("options", [SHARDS, {}], ids=["shards", "memory"])
def test_resume_gives_exactly_the_rest_of_the_epoch(digits_root: Path, options) -> None:
    plan = make_plan(1438, 32, 8, 2)
    full = epoch_batches(digits_root / "train", plan, rank=1, epoch=4, **options)
    rest = epoch_batches(digits_root / "train", plan, rank=1, epoch=4, start_step=30, **options)
    assert len(rest) == (plan.iterations_per_epoch - 30) * plan.accumulate
    assert same(rest, full[30 * plan.accumulate :])


@pytest.mark.parametrize("options", [SHARDS, {}], ids=["shards", "memory"])
def test_padded_samples_are_invalid(digits_root: Path, options) -> None:
    plan = make_plan(1438, 100, 25, 2)  # 15 iterations, 62 padded samples
    batches = [
        b for r in range(2) for b in epoch_batches(digits_root / "train", plan, r, **options)
    ]
    assert sum(int((~b.valid).sum()) for b in batches) == plan.padded_samples == 62


def test_eval_loader_covers_the_val_set_once_with_equal_counts(digits_root: Path) -> None:
    loaders = [build_eval_loader(digits_root / "val", 32, r, 4) for r in range(4)]
    assert len({len(loader) for loader in loaders}) == 1
    seen = [i for loader in loaders for b in loader for i in b.indices[b.valid].tolist()]
    assert sorted(seen) == list(range(359))


def test_png_images_leave_as_uint8_and_become_float_chw_on_the_device(png_root: Path) -> None:
    options = loader_options(input_key="png")
    (batch,) = list(build_eval_loader(png_root / "val", 16, 0, 1, options))
    assert batch.inputs.shape == (16, 5, 4, 3) and batch.inputs.dtype == torch.uint8  # as stored
    ready = InputPipeline(torch.device("cpu"))(batch)
    assert ready.inputs.shape == (16, 3, 5, 4) and ready.inputs.dtype == torch.float32
    assert 0.0 <= ready.inputs.min() and ready.inputs.max() <= 1.0
    torch.testing.assert_close(ready.inputs, batch.inputs.permute(0, 3, 1, 2).float() / 255)
    assert int(batch.valid.sum()) == 9


def test_the_pipeline_normalises_per_channel_in_the_models_memory_order(png_root: Path) -> None:
    options = loader_options(input_key="png")
    (batch,) = list(build_eval_loader(png_root / "val", 16, 0, 1, options))
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    pipeline = InputPipeline(torch.device("cpu"), channels_last=True, mean=mean, std=std)
    ready = pipeline(batch)
    plain = batch.inputs.permute(0, 3, 1, 2).float() / 255
    expected = (plain - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(ready.inputs, expected)
    assert ready.inputs.is_contiguous(memory_format=torch.channels_last)


def test_transform_is_applied_per_sample(digits_root: Path, png_root: Path) -> None:
    loader = build_eval_loader(digits_root / "val", 8, 0, 1, transform=lambda x: x.flatten())
    assert next(iter(loader)).inputs.shape == (8, 64)
    # A transform takes what the model would: float CHW in [0, 1] (converted on the host).
    options = loader_options(input_key="png")
    seen = []
    loader = build_eval_loader(
        png_root / "val", 4, 0, 1, options, transform=lambda x: seen.append(x) or x
    )
    next(iter(loader))
    assert seen[0].shape == (3, 5, 4) and seen[0].dtype == torch.float32 and seen[0].max() <= 1


def test_batch_moves_to_a_device(digits_root: Path) -> None:
    batch = next(iter(build_eval_loader(digits_root / "val", 8, 0, 1)))
    moved = batch.to("cpu")
    assert torch.equal(moved.inputs, batch.inputs) and moved.num_skipped == batch.num_skipped
    if torch.cuda.is_available():
        assert batch.pin_memory().inputs.is_pinned()


def test_missing_manifest_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="manifest.json: manifest missing"):
        read_manifest(tmp_path)


def test_missing_shard_is_named(digits_root: Path, tmp_path: Path) -> None:
    split = copy_split(digits_root / "val", tmp_path / "val")
    (split / "shard-000001.tar").unlink()
    with pytest.raises(DataError, match=r"shard-000001.tar: shard missing"):
        build_eval_loader(split, 8, 0, 1)


def test_truncated_shard_is_named(digits_root: Path, tmp_path: Path) -> None:
    split = copy_split(digits_root / "val", tmp_path / "val")
    shard = split / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-5000])
    with pytest.raises(DataError, match=r"shard-000000.tar: .* bytes but the manifest says"):
        build_eval_loader(split, 8, 0, 1)


def test_manifest_not_matching_its_shards_is_named(digits_root: Path, tmp_path: Path) -> None:
    split = copy_split(digits_root / "val", tmp_path / "val")
    other = copy_split(digits_root / "train", tmp_path / "train")
    (split / "shard-000000.tar").write_bytes((other / "shard-000000.tar").read_bytes())
    with pytest.raises(DataError, match="shard-000000.tar"):
        build_eval_loader(split, 8, 0, 1)
    plan = make_plan(1000, 10, 5, 2)
    with pytest.raises(DataError, match="plan is for 1,000 samples but the manifest lists 359"):
        build_train_loader(digits_root / "val", plan, 0, 0)


@pytest.mark.parametrize(
    ("workers", "memory_mb"), [(0, 0), (2, 0), (0, 256)], ids=["shards", "workers", "memory"]
)
def test_undecodable_sample_names_shard_and_key(
    digits_root: Path, tmp_path: Path, workers: int, memory_mb: float
) -> None:
    split = copy_split(digits_root / "val", tmp_path / "val")
    key = corrupt_npy(split, 1, 7)
    options = loader_options(num_workers=workers, in_memory_max_mb=memory_mb)
    with pytest.raises(DataError, match=f"shard-000001.tar: key {key}: undecodable .npy") as err:
        list(build_eval_loader(split, 16, 0, 1, options))  # memory: raised while loading
    assert str(err.value).startswith(str(split)) and "\n" not in str(err.value)


@pytest.mark.parametrize("memory_mb", [0, 256], ids=["shards", "memory"])
def test_skip_marks_bad_samples_invalid_and_counts_them(
    digits_root: Path, tmp_path: Path, memory_mb: float
) -> None:
    split = copy_split(digits_root / "train", tmp_path / "train")
    keys = {corrupt_npy(split, 0, 3), corrupt_npy(split, 4, 10)}
    index_split(split)  # checksums refreshed; the loader only checks sizes anyway
    plan = make_plan(1438, 64, 16, 2)
    options = loader_options(on_error="skip", in_memory_max_mb=memory_mb)
    loader = build_train_loader(split, plan, 0, 0, options)
    other = build_train_loader(split, plan, 1, 0, options)
    assert loader.memory is None  # bad samples are judged per micro-batch, from the shards
    batches = list(loader.epoch(0)) + list(other.epoch(0))
    assert len(batches) == 2 * plan.micro_batches_per_epoch
    assert loader.num_skipped + other.num_skipped == 2
    dataset = ShardDataset(split)
    bad = {i for i, k in enumerate(dataset.index.keys) if k in keys}
    for b in batches:
        for i, ok in zip(b.indices.tolist(), b.valid.tolist(), strict=True):
            if i in bad:
                assert not ok


def test_memory_gives_the_very_batches_the_shards_give(digits_root: Path, tmp_path: Path) -> None:
    plan = make_plan(1438, 96, 16, 2)  # accumulation 3, 32 padded samples
    for rank in (0, 1):
        memory = build_train_loader(digits_root / "train", plan, rank, 0, loader_options())
        shards = build_train_loader(digits_root / "train", plan, rank, 0, loader_options(**SHARDS))
        assert memory.memory is not None and shards.memory is None
        for epoch, start in ((0, 0), (3, 0), (3, 7)):
            assert same(list(memory.epoch(epoch, start)), list(shards.epoch(epoch, start)))
        evals = [
            build_eval_loader(digits_root / "val", 32, rank, 2, loader_options(**o))
            for o in ({}, SHARDS)
        ]
        assert evals[0].memory is not None and same(list(evals[0]), list(evals[1]))


def test_memory_applies_a_random_transform_per_micro_batch(png_root: Path) -> None:
    """The same draws in the same order: a resumed or re-run job is identical either way."""
    plan = make_plan(81, 16, 8, 1)
    runs = []
    for options in ({}, SHARDS):
        loader = build_train_loader(
            png_root / "train",
            plan,
            0,
            0,
            loader_options(input_key="png", **options),
            transform=lambda x: x + torch.rand(()),
        )
        torch.manual_seed(0)
        runs.append(list(loader.epoch(0)) + list(loader.epoch(1)))
    assert same(*runs)
    assert not torch.equal(runs[0][0].inputs, runs[0][len(runs[0]) // 2].inputs)


def test_memory_holds_only_splits_under_the_limit(digits_root: Path) -> None:
    # 359 val samples x 64 float32 = 92 KiB
    assert build_eval_loader(
        digits_root / "val", 8, 0, 1, loader_options(in_memory_max_mb=0.09)
    ).memory
    assert not build_eval_loader(
        digits_root / "val", 8, 0, 1, loader_options(in_memory_max_mb=0.08)
    ).memory
    with_workers = loader_options(num_workers=2)
    loader = build_train_loader(
        digits_root / "train",
        make_plan(1438, 64, 16, 1),
        0,
        0,
        with_workers,
        transform=torch.flatten,
    )
    assert loader.memory is None  # augmentation stays in the workers
    loader.close()


def test_npy_images_arrive_exactly_as_stored(tmp_path: Path) -> None:
    from ddp.shards.prepare import synthetic_arrays

    prepare_synthetic(tmp_path, 200, (6, 5, 3), num_classes=4, seed=3, shard_size=64)
    images, labels = synthetic_arrays(200, (6, 5, 3), 4, seed=3)
    keys = ShardDataset(tmp_path / "val").index.keys
    (batch,) = list(build_eval_loader(tmp_path / "val", 20, 0, 1))
    stored = [int(k.split("-")[1]) for k in keys]
    assert torch.equal(batch.inputs, torch.from_numpy(images[stored]))  # the bytes, as stored
    assert batch.targets.tolist() == labels[stored].tolist()


def test_reads_shards_written_by_webdataset(digits_root: Path, tmp_path: Path) -> None:
    import webdataset as wds

    split = tmp_path / "wds"
    split.mkdir()
    manifest = read_manifest(digits_root / "val")
    with wds.ShardWriter(str(split / "part-%04d.tar"), maxcount=100, verbose=0) as sink:
        for shard in manifest.shards:
            for sample in wds.WebDataset(str(digits_root / "val" / shard.name), shardshuffle=False):
                sink.write({k: sample[k] for k in ("__key__", "npy", "cls")})
    index_split(split)
    ours = [b for b in build_eval_loader(digits_root / "val", 359, 0, 1)]
    theirs = [b for b in build_eval_loader(split, 359, 0, 1)]
    assert same(ours, theirs)


def test_a_v1_manifest_gives_the_very_batches_of_v2(digits_root: Path, tmp_path: Path) -> None:
    split = copy_split(digits_root / "train", tmp_path / "train")
    plan = make_plan(1438, 64, 16, 2)
    ours = epoch_batches(split, plan, rank=1, epoch=2, start_step=3, **SHARDS)
    as_v1(split)
    assert read_manifest(split).version == 1
    assert same(epoch_batches(split, plan, rank=1, epoch=2, start_step=3, **SHARDS), ours)


def test_a_dataset_pickles_its_index_by_path(digits_root: Path) -> None:
    """A spawned DataLoader worker gets the index files' names, not their content."""
    dataset = ShardDataset(digits_root / "train")
    data = pickle.dumps(dataset.index)
    assert len(data) < 4000 and b"manifest.0.keys.txt" in data
    again = pickle.loads(data)
    picked = np.array([0, 700, 1437])
    assert again.keys[700] == dataset.index.keys[700]
    assert np.array_equal(again.offsets["npy"][picked], dataset.index.offsets["npy"][picked])


SET_UP = """
import sys
from ddp.order import rank_micro_batches
from ddp.plan import make_plan
from ddp.shards.manifest import SplitIndex, read_manifest

manifest = read_manifest(sys.argv[1])
index = SplitIndex.from_manifest(manifest)
plan = make_plan(manifest.num_samples, 1024, 64, 8)
last = plan.iterations_per_epoch - 1
for step in (0, last * 9 // 10, last):
    micro = next(rank_micro_batches(plan, 0, 3, 1, start_step=step))
    shards, offsets = index.shard_of(micro.indices), index.offsets["npy"][micro.indices]
    print(manifest.keys[int(micro.indices[0])], shards[0], offsets[0])
# VmHWM: the peak of this program's memory (ru_maxrss would count the parent's pages, held
# between fork and exec).
status = open("/proc/self/status").read()
print(int(status.split("VmHWM:")[1].split()[0]) // 1024)
"""


def test_set_up_at_a_billion_samples_holds_nothing_per_sample(tmp_path: Path) -> None:
    """Manifest, index and epoch order of 10^9 samples (a synthetic index of 20,000 shards
    of 50,000) in one process, with a seek to the start, 90% and the end of the epoch:
    peak RSS under 200 MB, where one int64 per sample alone would take 8,000 MB (and the
    v1 manifest ~250 GB)."""
    split = tmp_path / "billion"
    cmd = [str(harness.BIN / "ddp-shards"), "synth-index", str(split), "--shards", "20000"]
    out = harness.run([*cmd, "--samples-per-shard", "50000"], timeout=120)
    assert out.returncode == 0, out.stderr
    out = harness.run([sys.executable, "-c", SET_UP, str(split)], timeout=120)
    assert out.returncode == 0, out.stderr
    *lookups, peak_mb = out.stdout.split("\n")[:-1]
    assert len(lookups) == 3 and all(line.startswith("shard-") for line in lookups)
    assert int(peak_mb) < 200, f"peak RSS {peak_mb} MB"
