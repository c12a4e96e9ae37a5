"""On a GPU: the main job, bitwise resume, bf16 and fp16, the late-read step, the split on
the device, two ranks sharing one GPU over gloo (with CUDA tensors, so the comm hook,
pinned memory and the side-stream prefetch run across ranks), and JPEGs decoded by nvJPEG
(the host's crops, corrupt ones named or skipped, a bitwise resume).

Skipped without CUDA (CI has none). On the GPU machine: `pytest -m cuda tests/test_cuda.py`
(bench/gpu_check.sh runs it with the benchmark).
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import pytest
import torch

from ddp import checkpoint
from tests import harness
from tests.configs import loader_options
from tests.fixtures import smoke_overrides

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)"),
]


def on_gpu(digits_root: Path, root: Path, name: str, *extra: str) -> list[str]:
    return smoke_overrides(digits_root, root, name, "trainer.device=cuda", *extra)


def python_train(overrides: list[str], timeout: float = 300):
    return harness.run([sys.executable, "-m", "ddp.train", *overrides], timeout=timeout)


def torchrun_train(overrides: list[str], nproc: int = 2, timeout: float = 300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "ddp.train", *overrides]  # fmt: skip
    return harness.run(cmd, timeout=timeout)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(run_dir / "checkpoints" / "last.pt")["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_the_main_job_reaches_97_percent_on_cuda(digits_root, tmp_path):
    overrides = ["experiment=digits", f"data.root={digits_root}", f"run.root={tmp_path}",
                 "run.name=main", "trainer.device=cuda"]  # fmt: skip
    out = python_train(overrides)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(1 process(es), cuda)" in out.stdout
    (summary,) = harness.records(tmp_path / "main", "summary")
    assert summary["best_value"] >= 0.97


def test_resume_on_cuda_is_bitwise_equal(digits_root, tmp_path):
    common = ("trainer.deterministic=true", "model.dropout=0.2", "trainer.max_epochs=3")
    straight = python_train(on_gpu(digits_root, tmp_path, "straight", *common))
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = python_train(on_gpu(digits_root, tmp_path, "resumed", *common, "trainer.max_steps=30"))
    assert first.returncode == 0, first.stderr[-3000:]
    again = python_train(on_gpu(digits_root, tmp_path, "resumed", *common))
    assert again.returncode == 0 and "(continuing at epoch 1 step 7" in again.stdout
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed")


def test_a_late_read_step_gives_the_same_run_as_a_synchronous_one(digits_root, tmp_path):
    for sync in ("true", "null"):  # null: the GPU default, one step late
        extra = ("trainer.deterministic=true", f"trainer.sync_every_step={sync}")
        out = python_train(on_gpu(digits_root, tmp_path, f"sync-{sync}", *extra))
        assert out.returncode == 0, out.stderr[-3000:]
    assert_same_weights(tmp_path / "sync-true", tmp_path / "sync-null")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_trains(digits_root, tmp_path, precision):
    out = python_train(on_gpu(digits_root, tmp_path, precision, f"trainer.precision={precision}",
                              "model=cnn", "trainer.max_epochs=3"))  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    vals = harness.records(tmp_path / precision, "val")
    assert vals[-1]["val/accuracy"] > 0.5
    state = checkpoint.load(tmp_path / precision / "checkpoints" / "last.pt")
    assert bool(state["scaler"]) == (precision == "fp16")  # the GradScaler's state rides along


def test_a_split_on_the_device_gives_the_batches_of_the_host(digits_root, tmp_path):
    for on_device in ("true", "false"):
        extra = ("trainer.deterministic=true", f"data.loader.on_device={on_device}")
        out = python_train(on_gpu(digits_root, tmp_path, f"dev-{on_device}", *extra))
        assert out.returncode == 0, out.stderr[-3000:]
    assert_same_weights(tmp_path / "dev-true", tmp_path / "dev-false")


def test_two_ranks_share_one_gpu_over_gloo(digits_root, tmp_path):
    extra = ("trainer.backend=gloo", "trainer.audit_samples=true", "data.loader.in_memory_max_mb=0",
             "data.loader.num_workers=2")  # fmt: skip
    out = torchrun_train(on_gpu(digits_root, tmp_path, "shared", *extra))
    assert out.returncode == 0, out.stderr[-3000:]
    (summary,) = harness.records(tmp_path / "shared", "summary")
    assert summary["micro_batches_per_rank"][0] == summary["micro_batches_per_rank"][1]
    for epoch in harness.records(tmp_path / "shared", "val"):
        assert epoch["audit/missing_samples"] == 0


def test_more_processes_than_gpus_is_refused(digits_root, tmp_path):
    n = torch.cuda.device_count() + 1
    out = torchrun_train(on_gpu(digits_root, tmp_path, "many"), nproc=n)
    assert f"{n} processes on this node but {n - 1} GPU(s) visible" in out.stderr


def test_prefetch_on_a_side_stream_hands_over_the_right_batches():
    from ddp.data.batch import Batch
    from ddp.data.device import InputPipeline, Prefetcher

    host = [
        Batch(torch.randint(0, 256, (64, 8, 8, 3), dtype=torch.uint8), torch.arange(64),
              torch.ones(64, dtype=torch.bool), torch.arange(64)).pin_memory()
        for _ in range(5)
    ]  # fmt: skip
    pipeline = InputPipeline(torch.device("cuda"), mean=[0.5] * 3, std=[0.25] * 3)
    for fetched, batch in zip(Prefetcher(iter(host), pipeline), host, strict=True):
        expected = pipeline(batch).inputs
        torch.cuda.synchronize()
        assert torch.equal(fetched.inputs, expected)


# ---- JPEGs decoded on the GPU (data.augment.placement=device, issue 13)


def photo_batches(photos_root: Path, placement: str, size: int = 40) -> list:
    from ddp.data.images import ImageAugment
    from ddp.data.loaders import build_train_loader
    from ddp.plan import make_plan

    images = ImageAugment(size=size, train=True, seed=0, placement=placement)
    options = loader_options(input_key="jpg", pin_memory=True, device=torch.device("cuda"))
    loader = build_train_loader(
        photos_root / "train", make_plan(128, 32, 16, 1), 0, 0, options, images=images
    )
    return list(loader.epoch(1))


def test_nvjpeg_cuts_the_crops_the_host_cuts(photos_root):
    from ddp.data.device import InputPipeline, Prefetcher

    pipeline = InputPipeline(torch.device("cuda"))
    host = list(Prefetcher(iter(photo_batches(photos_root, "host")), pipeline))
    device = list(Prefetcher(iter(photo_batches(photos_root, "device")), pipeline))
    assert len(host) == len(device) == 8
    for a, b in zip(host, device, strict=True):
        assert b.inputs.is_cuda and b.inputs.shape == (16, 3, 40, 40)
        assert torch.equal(a.targets, b.targets) and bool(b.valid.all())
        # nvJPEG and libjpeg-turbo round differently (IDCT, chroma upsampling): levels,
        # where another crop would differ by tens of levels on average.
        assert (a.inputs - b.inputs).abs().mean() < 3 / 255


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_jpeg_nvjpeg_cannot_decode_is_named_or_skipped(photos_root, on_error):
    import re
    from dataclasses import replace

    import numpy as np

    from ddp.data.device_jpeg import decode_jpegs
    from ddp.errors import DataError
    from tests.fixtures import break_huffman_table

    (batch, *_) = photo_batches(photos_root, "device")
    jpegs = replace(batch.jpegs, data=batch.jpegs.data.clone(), on_error=on_error)
    lo, hi = jpegs.offsets[4].item(), jpegs.offsets[5].item()
    broken = break_huffman_table(bytes(jpegs.data[lo:hi].numpy()))
    jpegs.data[lo:hi] = torch.from_numpy(np.frombuffer(broken, dtype=np.uint8).copy())
    cuda = torch.device("cuda")
    if on_error == "raise":
        with pytest.raises(DataError, match=re.escape(f"{jpegs.names[4]}: undecodable JPEG")):
            decode_jpegs(replace(batch, jpegs=jpegs), cuda)
        return
    clean = decode_jpegs(batch, cuda)
    skipped = decode_jpegs(replace(batch, jpegs=jpegs), cuda)
    assert skipped.num_skipped == 1 and skipped.valid.tolist() == [i != 4 for i in range(16)]
    assert not skipped.inputs[4].any()
    keep = torch.arange(16) != 4
    assert torch.equal(skipped.inputs[keep], clean.inputs[keep])


def test_gpu_decoding_trains_and_resumes_bitwise_equal(photos_root, tmp_path):
    def job(name: str, *extra: str) -> list[str]:
        return ["experiment=photos", f"data.root={photos_root}", f"run.root={tmp_path}",
                f"run.name={name}", "trainer.device=cuda", "trainer.deterministic=true",
                "data.augment.placement=device", "data.augment.size=32",
                "data.loader.num_workers=2", "batch.global_size=32", "batch.micro_size=16",
                "trainer.max_epochs=3",
                "trainer.progress=false", "plateau=none", "logger=none", *extra]  # fmt: skip

    straight = python_train(job("straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = python_train(job("resumed", "trainer.max_steps=6"))  # epoch 1, step 2 of 4
    assert first.returncode == 0, first.stderr[-3000:]
    again = python_train(job("resumed"))
    assert again.returncode == 0 and "(continuing at epoch 1 step 2" in again.stdout
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed")
    vals = harness.records(tmp_path / "straight", "val")
    assert vals[-1]["val/accuracy"] > 1 / 8  # it learns something from GPU-decoded crops


def test_micro_size_auto_finds_what_fits_and_trains(digits_root, tmp_path):
    """Real trial steps on the GPU: the digits MLP's step at the largest micro-batch the
    plan allows (G=256 on one process) peaks far below the device's memory, so that one
    is taken, said in one line, and the run trains with it (no accumulation)."""
    extra = ("batch.micro_size=auto", "batch.global_size=256", "trainer.max_epochs=1")
    out = python_train(on_gpu(digits_root, tmp_path, "auto", *extra))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "batch.micro_size=auto: 256 (a step's peak of 85% of" in out.stdout
    (plan,) = harness.records(tmp_path / "auto", "plan")
    assert plan["micro_size"] == 256 and plan["config"]["batch"]["micro_size"] == 256


def test_where_the_time_goes_on_a_gpu(digits_root, tmp_path):
    """CUDA events: the parts of every epoch sum to 1, the split on the device leaves
    almost no data wait, MFU against the device's peak (H100/H200: in the table), the
    peak memory of the allocator, and a trace with CUDA kernels in it."""
    extra = ("data.loader.on_device=true", "trainer.precision=bf16", "trainer.profile=[3,4]",
             "trainer.count_flops=true")  # fmt: skip
    out = python_train(on_gpu(digits_root, tmp_path, "perf", *extra))
    assert out.returncode == 0, out.stderr[-3000:]
    plan = harness.records(tmp_path / "perf", "plan")[0]
    name = torch.cuda.get_device_name()
    if any(known in name for known in ("H100", "H200", "A100", "L40S", "RTX 4090")):
        assert plan["perf/peak_tflops"] > 100
    for record in harness.records(tmp_path / "perf", "val"):
        parts = ("data", "compute", "comm", "optimizer", "other")
        assert sum(record[f"time/{p}"] for p in parts) == pytest.approx(1.0, abs=0.01)
        assert record["time/data"] < 0.15 and record["time/compute"] > 0
        assert 0 < record["memory/peak_gb"] <= record["memory/reserved_gb"]
        assert plan["perf/peak_tflops"] is None or 0 < record["perf/mfu"] < 1
    (trace,) = (tmp_path / "perf" / "profile").iterdir()
    text = gzip.decompress(trace.read_bytes()).decode()
    assert '"forward_backward"' in text and '"cat": "kernel"' in text


def test_an_out_of_memory_leaves_a_snapshot_and_the_checkpoint(digits_root, tmp_path):
    """A real CUDA out-of-memory in global step 6 (after a checkpoint at step 4, or 5 as
    the late-read step accounts for the step queued behind it): one line naming the
    micro-batch and the knob, exit 2, the snapshot in the run directory, last.pt kept."""
    extra = ("model._target_=tests.workers.perf_parts.Hungry", "+model.after=5",
             "trainer.checkpoint.every_steps=4", "trainer.memory_snapshot=true",
             "batch.micro_size=64", "batch.global_size=64")  # fmt: skip
    out = python_train(on_gpu(digits_root, tmp_path, "oom", *extra))
    assert out.returncode == 2, out.stderr[-3000:]
    (line,) = [x for x in out.stderr.splitlines() if x.strip()]
    assert line.startswith("error: CUDA out of memory on rank 0 with batch.micro_size=64")
    snapshot = tmp_path / "oom" / "memory_snapshot_rank0.pickle"
    assert str(snapshot) in line and snapshot.stat().st_size > 0
    last = checkpoint.load(tmp_path / "oom" / "checkpoints" / "last.pt")
    assert last["position"]["global_step"] in (4, 5)
