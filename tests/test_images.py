"""JPEG photos, decoded and augmented (ddp.data.images): the photos source, crops drawn
from (seed, epoch, sample), both placements, bad JPEGs named or skipped, and every
guarantee of the epoch order with augmentation on, up to a real 2-process run killed
mid-epoch and resumed bitwise."""

from __future__ import annotations

import io
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddp import checkpoint
from ddp.compose import compose
from ddp.data import images as images_module
from ddp.data.batch import Batch
from ddp.data.dataset import ShardDataset
from ddp.data.device import InputPipeline
from ddp.data.device_jpeg import decode_jpegs
from ddp.data.images import (
    Crop,
    ImageAugment,
    decode_on_host,
    jpeg_size,
    random_resized_crop,
    reducible,
)
from ddp.data.loaders import build_eval_loader, build_train_loader
from ddp.errors import ConfigError, DataError
from ddp.plan import make_plan
from ddp.shards import read_manifest
from ddp.shards.prepare import photo_classes, photo_sample, prepare_photos
from tests import harness
from tests.configs import loader_options
from tests.fixtures import break_huffman_table, copy_split, corrupt_member, garble
from tests.test_data import same

JPG = loader_options(input_key="jpg")
CPU = torch.device("cpu")


def augment(placement: str = "host", train: bool = True, size: int = 24, seed: int = 0):
    return ImageAugment(size=size, train=train, seed=seed, placement=placement)  # type: ignore[arg-type]


def epoch_batches(split: Path, plan, rank=0, epoch=0, start_step=0, workers=0, **kw) -> list[Batch]:
    options = loader_options(input_key="jpg", num_workers=workers)
    loader = build_train_loader(split, plan, rank, 0, options, images=augment(**kw))
    try:
        return list(loader.epoch(epoch, start_step))
    finally:
        loader.close()


def on_device(batches: list[Batch]) -> list[Batch]:
    """What the model receives: the device pipeline applied (decodes placement=device)."""
    pipeline = InputPipeline(CPU)
    return [pipeline(b) for b in batches]


def jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# ---- the photos source


def test_prepare_photos_writes_labelled_jpegs_of_about_the_size_asked(photos_root: Path) -> None:
    train, val = read_manifest(photos_root / "train"), read_manifest(photos_root / "val")
    assert (train.num_samples, val.num_samples, len(train.shards)) == (128, 32, 3)
    assert train.meta["classes"] == photo_classes() and train.meta["num_classes"] == 8
    dataset = ShardDataset(photos_root / "train", input_key="jpg")
    labels = Counter()
    for index in range(len(dataset)):
        height, width = jpeg_size(dataset.raw(index, "jpg"))
        assert 0.75 * 64 <= width <= 1.3 * 64 and 0.75 * 56 <= height <= 1.3 * 56
        labels[int(bytes(dataset.raw(index, "cls")))] += 1
    assert set(labels) == set(range(8))  # both photos, all four quadrants


def test_prepare_photos_is_a_pure_function_of_the_seed(tmp_path: Path) -> None:
    made = [
        prepare_photos(tmp_path / name, 24, seed=seed, size=(40, 32), shard_size=10, workers=w)
        for name, seed, w in (("a", 3, 1), ("b", 3, 2), ("c", 4, 1))
    ]
    checksums = [[s.sha256 for s in m["train"].shards] for m in made]
    assert checksums[0] == checksums[1] != checksums[2]  # the worker count changes nothing
    data, label = photo_sample(5, seed=3, size=(40, 32))
    assert label == (5 % 2) * 4 + label % 4 and Image.open(io.BytesIO(data)).format == "JPEG"


def test_cli_prepare_photos(tmp_path: Path, capsys) -> None:
    from ddp.shards.cli import main

    argv = ["prepare", "photos", "--num-samples", "20", "--size", "40,32", "--workers", "1"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    assert "train: 18 samples in 1 shards" in capsys.readouterr().out
    assert main([*argv[:-2], "--workers", "0", "--out", str(tmp_path)]) == 2
    assert "--workers must be >= 1" in capsys.readouterr().err


# ---- crops: torchvision's algorithm, drawn from (seed, epoch, sample)


def test_random_resized_crops_stay_inside_and_within_scale_and_ratio() -> None:
    rng = np.random.Generator(np.random.PCG64(0))
    for height, width in ((350, 400), (56, 64), (1000, 30), (3, 3)):
        for _ in range(200):
            top, left, h, w = random_resized_crop(rng, height, width, (0.08, 1.0), (3 / 4, 4 / 3))
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
            assert h >= 1 and w >= 1
            if (height, width) == (350, 400):  # never the fallback on an ordinary photo
                area = h * w / (height * width)
                assert 0.07 <= area <= 1.0 and 0.7 <= w / h <= 1.4


def test_a_sample_s_crop_depends_on_seed_epoch_and_index_only() -> None:
    a = augment(size=224)  # no crop of a 350 x 400 image is reduced: all stay as drawn
    crops = [a.crop(350, 400, index, epoch) for epoch in range(3) for index in range(50)]
    assert crops == [a.crop(350, 400, i, e) for e in range(3) for i in range(50)]  # pure
    assert len(set(crops)) == len(crops)  # new for every sample and epoch
    assert a.crop(350, 400, 7, 1) != augment(seed=1, size=224).crop(350, 400, 7, 1)
    flips = [c.flip for c in crops]
    assert 0.35 < sum(flips) / len(flips) < 0.65
    assert augment("device", size=224).crop(350, 400, 7, 1) == a.crop(350, 400, 7, 1)


def test_evaluation_takes_the_center_crop_and_never_flips() -> None:
    a = augment(train=False, size=224)
    assert a.crop(350, 400, 3, 0) == Crop((350 - 306) // 2, (400 - 306) // 2, 306, 306, False)
    assert a.crop(350, 400, 3, 0) == a.crop(350, 400, 9, 5)


# ---- decoding


def test_jpeg_size_reads_the_frame_header_and_refuses_a_broken_stream() -> None:
    data = jpeg(np.zeros((30, 50, 3), dtype=np.uint8))
    assert jpeg_size(data) == (30, 50)
    for broken, reason in (
        (b"\x89PNG" + data[4:], "not a JPEG"),
        (data[:-200], "truncated JPEG"),
        (data[:100], "truncated JPEG header"),
    ):
        with pytest.raises(ValueError, match=reason):
            jpeg_size(broken)


def test_a_decoded_crop_is_the_crop_of_the_image() -> None:
    """A gradient image: the crop's corners land where the box says, mirrored or not."""
    y, x = np.mgrid[0:120, 0:160]
    image = np.stack([x * 255 // 159, y * 255 // 119, np.full_like(x, 128)], -1).astype(np.uint8)
    data = jpeg(image, quality=100)
    for flip in (False, True):
        out = decode_on_host(data, lambda h, w, f=flip: Crop(20, 40, 64, 64, f), 64)
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8
        left, right = (out[:, -1], out[:, 0]) if flip else (out[:, 0], out[:, -1])
        assert abs(int(left[:, 0].mean()) - 40 * 255 // 159) <= 3
        assert abs(int(right[:, 0].mean()) - 103 * 255 // 159) <= 3
        assert abs(int(out[0, :, 1].mean()) - 20 * 255 // 119) <= 3


def test_a_large_crop_is_moved_onto_the_grid_of_its_reduction() -> None:
    rng = np.random.Generator(np.random.PCG64(1))
    for _ in range(500):
        height, width = (int(v) for v in rng.integers(20, 900, 2))
        size = int(rng.integers(4, 64))
        box = random_resized_crop(rng, height, width, (0.08, 1.0), (3 / 4, 4 / 3))
        (top, left, h, w), reduce = reducible(box, height, width, size)
        assert top % reduce == left % reduce == h % reduce == w % reduce == 0
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        if reduce > 1:
            assert min(h, w) >= reduce * size
            assert abs(top - box[0]) <= reduce / 2 and abs(left - box[1]) <= reduce / 2
        else:
            assert (top, left, h, w) == box


def test_a_large_crop_is_decoded_at_a_reduced_scale_with_the_same_content() -> None:
    rng = np.random.Generator(np.random.PCG64(0))
    blocks = np.kron(rng.integers(0, 255, (12, 16, 3)), np.ones((20, 20, 1))).astype(np.uint8)
    data = jpeg(blocks)
    box, reduce = reducible((10, 10, 200, 280), 240, 320, 48)
    assert reduce == 4 and box == (12, 12, 200, 280)
    reduced = decode_on_host(data, lambda h, w: Crop(*box, False, reduce), 48)
    full = decode_on_host(data, lambda h, w: Crop(*box, False), 48)
    # DCT scaling low-passes a little differently from the antialiased resize, at block edges
    assert np.abs(reduced.astype(float) - full).mean() < 4


@pytest.mark.skipif(images_module._simplejpeg() is None, reason="simplejpeg is not installed")
def test_simplejpeg_and_pillow_give_the_same_pixels(photos_root: Path, monkeypatch) -> None:
    dataset = ShardDataset(photos_root / "val", input_key="jpg")
    members = [bytes(dataset.raw(i, "jpg")) for i in range(8)]
    crops = [Crop(4, 4, 40, 44, i % 2 == 1, (1, 2, 4)[i % 3]) for i in range(8)]  # some reduced
    fast = [decode_on_host(m, lambda h, w, c=c: c, 10) for m, c in zip(members, crops, strict=True)]
    monkeypatch.setattr(images_module, "_simplejpeg", lambda: None)
    slow = [decode_on_host(m, lambda h, w, c=c: c, 10) for m, c in zip(members, crops, strict=True)]
    assert all(np.array_equal(a, b) for a, b in zip(fast, slow, strict=True))


def test_host_and_device_placements_cut_the_same_crops(photos_root: Path) -> None:
    plan = make_plan(128, 32, 16, 1)
    split = photos_root / "train"  # output 40: no crop is 80 wide, none is decoded reduced
    host = on_device(epoch_batches(split, plan, epoch=2, size=40))
    device = on_device(epoch_batches(split, plan, epoch=2, size=40, placement="device"))
    for a, b in zip(host, device, strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.targets, b.targets)
        assert a.inputs.shape == b.inputs.shape == (16, 3, 40, 40)
        assert (a.inputs - b.inputs).abs().max() <= 1 / 255 + 1e-6  # uint8 rounding only


def test_device_batches_carry_the_bytes_as_stored(photos_root: Path) -> None:
    plan = make_plan(128, 32, 16, 1)
    (batch, *_) = epoch_batches(photos_root / "train", plan, placement="device")
    dataset = ShardDataset(photos_root / "train", input_key="jpg")
    jpegs = batch.jpegs
    assert batch.inputs.shape == (16, 0) and jpegs is not None
    for i, index in enumerate(batch.indices.tolist()):
        lo, hi = jpegs.offsets[i].item(), jpegs.offsets[i + 1].item()
        assert bytes(jpegs.data[lo:hi].numpy()) == bytes(dataset.raw(index, "jpg"))
        assert jpegs.names[i].endswith(f"key {dataset.index.keys[index]}")
        crop = augment().crop(*jpeg_size(dataset.raw(index, "jpg")), index, 0)
        assert jpegs.crops[i].tolist() == list(crop[:5])


# ---- the epoch order's guarantees, with augmentation on


@pytest.mark.parametrize("placement", ["host", "device"])
def test_every_sample_once_per_epoch_with_equal_counts(photos_root: Path, placement) -> None:
    plan = make_plan(128, 24, 4, 3)  # 6 iterations, 16 padded samples, accumulation 2
    seen: Counter = Counter()
    for rank in range(3):
        batches = on_device(epoch_batches(photos_root / "train", plan, rank, placement=placement))
        assert len(batches) == plan.micro_batches_per_epoch
        for b in batches:
            assert b.inputs.shape == (4, 3, 24, 24) and b.inputs.dtype == torch.float32
            seen.update(b.indices[b.valid].tolist())
    assert sorted(seen) == list(range(128)) and set(seen.values()) == {1}


@pytest.mark.parametrize("placement", ["host", "device"])
def test_the_same_crops_with_0_and_2_workers(photos_root: Path, placement) -> None:
    plan = make_plan(128, 32, 8, 2)
    for epoch, start in ((0, 0), (1, 2)):  # persistent workers see the new epoch
        serial = epoch_batches(photos_root / "train", plan, 1, epoch, start, placement=placement)
        parallel = epoch_batches(
            photos_root / "train", plan, 1, epoch, start, workers=2, placement=placement
        )
        assert same(on_device(serial), on_device(parallel))


def test_a_resumed_epoch_sees_the_crops_of_the_uninterrupted_one(photos_root: Path) -> None:
    plan = make_plan(128, 16, 8, 1)
    full = epoch_batches(photos_root / "train", plan, epoch=3)
    rest = epoch_batches(photos_root / "train", plan, epoch=3, start_step=5)
    assert same(rest, full[5 * plan.accumulate :])
    again = epoch_batches(photos_root / "train", plan, epoch=4)
    assert not torch.equal(full[0].inputs, again[0].inputs)  # new crops every epoch


def test_validation_is_the_same_every_time_and_covers_the_split(photos_root: Path) -> None:
    loaders = [
        build_eval_loader(photos_root / "val", 8, r, 2, JPG, images=augment(train=False))
        for r in range(2)
    ]
    first = [b for loader in loaders for b in loader]
    assert same(first, [b for loader in loaders for b in loader])
    seen = [i for b in first for i in b.indices[b.valid].tolist()]
    assert sorted(seen) == list(range(32))
    assert all(loader.memory is None for loader in loaders)  # decoded per micro-batch


# ---- bad JPEGs


@pytest.mark.parametrize("placement", ["host", "device"])
@pytest.mark.parametrize("damage", [garble, break_huffman_table], ids=["header", "huffman"])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_jpeg_is_named_by_shard_and_key(
    photos_root: Path, tmp_path: Path, placement, damage, workers
) -> None:
    split = copy_split(photos_root / "val", tmp_path / "val")
    key = corrupt_member(split, 0, 5, "jpg", damage)
    options = loader_options(input_key="jpg", num_workers=workers)
    loader = build_eval_loader(split, 8, 0, 1, options, images=augment(placement, train=False))
    with pytest.raises(DataError, match=f"shard-000000.tar: key {key}: undecodable") as err:
        on_device(list(loader))
    assert str(err.value).startswith(str(split)) and "\n" not in str(err.value)


@pytest.mark.parametrize("placement", ["host", "device"])
@pytest.mark.parametrize("damage", [garble, break_huffman_table], ids=["header", "huffman"])
def test_skip_masks_a_corrupt_jpeg_and_counts_it(
    photos_root: Path, tmp_path: Path, placement, damage
) -> None:
    split = copy_split(photos_root / "train", tmp_path / "train")
    corrupt_member(split, 1, 3, "jpg", damage)
    bad = 48 + 3  # shard 1 starts at sample 48
    plan = make_plan(128, 32, 8, 2)
    options = loader_options(input_key="jpg", on_error="skip")
    batches = []
    for rank in range(2):
        loader = build_train_loader(split, plan, rank, 0, options, images=augment(placement))
        batches += on_device(list(loader.epoch(0)))
    assert len(batches) == 2 * plan.micro_batches_per_epoch
    assert sum(b.num_skipped for b in batches) == 1
    for b in batches:
        for i, index in enumerate(b.indices.tolist()):
            if index == bad:
                assert not b.valid[i] and not b.inputs[i].any()


def test_a_device_decode_failure_names_the_sample(photos_root: Path) -> None:
    plan = make_plan(128, 32, 16, 1)
    (batch, *_) = epoch_batches(photos_root / "train", plan, placement="device")
    jpegs = batch.jpegs
    lo, hi = jpegs.offsets[4].item(), jpegs.offsets[5].item()
    jpegs.data[lo:hi] = torch.from_numpy(
        np.frombuffer(break_huffman_table(bytes(jpegs.data[lo:hi].numpy())), dtype=np.uint8).copy()
    )
    with pytest.raises(DataError, match=re.escape(f"{jpegs.names[4]}: undecodable JPEG")):
        decode_jpegs(batch, CPU)


# ---- config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.augment.placement=gpu", "data.augment.placement='gpu' must be one of host, device"),
        ("data.augment.size=0", "data.augment.size=0 must be an integer >= 1"),
        ("data.augment.scale=[0.5,0.1]", "data.augment.scale=[0.5, 0.1] must be [min, max]"),
        ("data.augment.scale=[0.5,2.0]", "data.augment.scale=[0.5, 2.0] must be within (0, 1]"),
        ("data.augment.eval_crop=0", "data.augment.eval_crop=0.0 must be in (0, 1]"),
        (
            "data.stream.urls=[x.tar]",
            "data.augment needs indexed shards: not with data.stream.urls",
        ),
    ],
)
def test_a_bad_augment_value_is_refused_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose(["experiment=photos", override])


def test_augmentation_composes_onto_any_data_set() -> None:
    config = compose(["experiment=digits", "+data/augment=crop_flip", "data.augment.size=8"])
    assert config.data.augment is not None and config.data.augment.size == 8
    assert compose(["experiment=digits"]).data.augment is None


# ---- the trainer: a real 2-process job, killed mid-epoch and resumed


def job(photos_root: Path, run_root: Path, name: str, *extra: str) -> list[str]:
    """experiment=photos at 24x24: 2 processes, 4 steps an epoch, 2 epochs, dropout on,
    checkpointed every 2 steps, every step in metrics.jsonl."""
    return [
        "experiment=photos",
        f"data.root={photos_root}",
        f"run.root={run_root}",
        f"run.name={name}",
        "data.augment.size=24",
        "model.channels=[8,16]",
        "batch.global_size=32",
        "batch.micro_size=8",
        "trainer.max_epochs=2",
        "trainer.progress=false",
        "trainer.log_every_steps=1",
        "trainer.checkpoint.every_steps=2",
        "trainer.audit_samples=true",
        "plateau=none",
        "logger=none",
        *extra,
    ]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(run_dir / "checkpoints" / "last.pt")["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs"


@pytest.mark.slow
def test_a_job_killed_mid_epoch_resumes_bitwise_equal_with_augmentation(
    photos_root: Path, tmp_path: Path
) -> None:
    """With host placement (workers decode); the device placement cuts the same crops
    (test_host_and_device_placements_cut_the_same_crops) from the same (seed, epoch,
    sample), and the resume machinery does not know where decoding runs."""
    common = ("data.augment.placement=host",)
    reference = harness.train(
        job(photos_root, tmp_path, "reference", *common, "data.loader.num_workers=0")
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    run = harness.start(
        harness.trainer(
            job(photos_root, tmp_path, "killed", *common, "data.loader.num_workers=1"),
            torchrun_args=["--max-restarts=2"],
        )
    )
    run.wait_for_file(tmp_path / "killed" / "checkpoints" / "last.pt")  # epoch 0, step 2
    run.wait_for_record(tmp_path / "killed", "train", 3)  # past it: step 3 is redone
    run.worker(rank=1).kill()
    out = run.finish()
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(continuing at epoch" in out.stdout
    assert_same_weights(tmp_path / "killed", tmp_path / "reference")
    steps = [r["step"] for r in harness.records(tmp_path / "killed", "train")]
    assert steps == list(range(1, 2 * 4 + 1))
    for epoch in harness.records(tmp_path / "reference", "val"):  # every sample once
        assert epoch["audit/missing_samples"] == 0 and epoch["audit/repeated_samples"] == 0
