"""A run stays one run: a resume never mixes data sets, a refusal found once the data is
open still changes nothing, a finished run run again does nothing, and a refusal is one
line whatever the number of processes.

Each refusal is checked as in test_nothing_lost: exit 2, one `error:` line naming the
culprit, no traceback, every file of the run byte-identical (hashed before and after).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ddp import checkpoint
from ddp.data.identity import data_identity, what_changed
from ddp.data.splits import open_splits
from ddp.shards.manifest import read_manifest
from tests import harness
from tests.fixtures import copy_split, smoke_overrides
from tests.refusals import again, assert_refused, error_lines, snapshot

pytestmark = pytest.mark.slow


def other_digits(digits_root: Path, at: Path, changed: bool = True) -> Path:
    """A byte copy of the digits splits at `at`; with `changed`, one training sample's
    pixels differ (its shard rewritten in place, the manifest re-indexed as a user's
    tools would): the same size, other data."""
    copy_split(digits_root / "train", at / "train")
    copy_split(digits_root / "val", at / "val")
    if changed:
        from ddp.shards import index_split

        shard = read_manifest(at / "train").shards[1]
        path = at / "train" / shard.name
        data = bytearray(path.read_bytes())
        offset, size = shard.members["npy"]["offsets"][5], shard.members["npy"]["sizes"][5]
        data[offset + size - 8 : offset + size] = bytes(8)  # the last pixels: still an .npy
        path.write_bytes(bytes(data))
        index_split(at / "train")
    return at


# ---------------------------------------------------------------- which data


def test_the_data_identity_is_content_not_place(digits_root, tmp_path):
    """The same shards elsewhere are the same data; one rewritten sample is not."""
    here = data_identity(open_splits(_data(digits_root)))
    moved = data_identity(open_splits(_data(other_digits(digits_root, tmp_path / "a", False))))
    other = data_identity(open_splits(_data(other_digits(digits_root, tmp_path / "b"))))
    assert moved == here
    assert other["val"] == here["val"] and other["train"] != here["train"]
    assert other["train"]["samples"] == here["train"]["samples"] == 1438
    change = what_changed(here, other)
    assert change is not None and change.startswith("the training data changed: same size")
    assert what_changed(None, other) is None  # a checkpoint from before identities


def _data(root: Path):
    from ddp.compose import compose

    return compose(["experiment=smoke", f"data.root={root}"]).data


def test_a_resume_on_other_data_is_refused(digits_root, run_copy, tmp_path):
    """Another split of the same size under the run's data.root (or a data.root that
    points at one): refused, naming the split, nothing written."""
    other = other_digits(digits_root, tmp_path / "other")
    before = snapshot(run_copy)
    out = again(digits_root, run_copy, f"data.root={other}")
    line = assert_refused(out, "cannot resume", "the training data changed", "same size")
    assert "restart_epoch_on_plan_change" in line
    assert snapshot(run_copy) == before


def test_a_resume_on_the_same_data_moved_elsewhere_continues(digits_root, run_copy, tmp_path):
    moved = other_digits(digits_root, tmp_path / "moved", changed=False)
    out = again(digits_root, run_copy, f"data.root={moved}", "trainer.max_epochs=3")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "continuing at epoch 2 step 0" in out.stdout


def test_other_data_mid_epoch_restarts_the_epoch_when_asked(digits_root, tmp_path):
    """restart_epoch_on_plan_change=true: the epoch restarts on the new data, said in one
    line, and the checkpoint then records the new data."""
    runs, other = tmp_path / "runs", other_digits(digits_root, tmp_path / "other")
    overrides = smoke_overrides(digits_root, runs, "mid", "trainer.max_steps=30")
    first = harness.train(overrides, nproc=0)
    assert first.returncode == 0, first.stderr[-3000:]
    assert checkpoint.load(runs / "mid" / "checkpoints" / "last.pt")["position"]["epoch"] == 1
    overrides = smoke_overrides(other, runs, "mid", "trainer.restart_epoch_on_plan_change=true")
    out = harness.train(overrides, nproc=0)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "continuing at epoch 1 step 0" in out.stdout
    (note,) = [line for line in out.stdout.splitlines() if line.startswith("note:")]
    assert "the training data changed" in note and "epoch 1 restarts from its first step" in note
    saved = checkpoint.load(runs / "mid" / "checkpoints" / "last.pt")
    assert saved["data"] == data_identity(open_splits(_data(other)))


# ---------------------------------------------------------------- refusals once the data is open


def corrupt_every_sample(split: Path) -> None:
    """Every training sample's .npy made unreadable in place (sizes and the manifest
    unchanged, as a disk or a copy gone wrong would leave them): the loader finds it at
    the first batch, not at start-up."""
    for shard in read_manifest(split).shards:
        path = split / shard.name
        data = bytearray(path.read_bytes())
        for offset in shard.members["npy"]["offsets"]:
            data[offset : offset + 6] = b"garbag"
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("nproc", [0, 2], ids=["python", "torchrun"])
def test_unreadable_first_batches_on_resume_change_nothing(digits_root, run_copy, tmp_path, nproc):
    """A finished run given a third epoch, whose shards went bad since: found while
    reading the first step's micro-batches, before the plan record, the metrics file or
    W&B are touched."""
    data = other_digits(digits_root, tmp_path / "data", changed=False)
    corrupt_every_sample(data / "train")
    before = snapshot(run_copy)
    extra = (f"data.root={data}", "trainer.max_epochs=3", "data.loader.in_memory_max_mb=0")
    out = again(digits_root, run_copy, *extra, nproc=nproc)
    assert_refused(out, "shard-0000")
    assert len(error_lines(out)) == 1, out.stderr[-3000:]
    assert snapshot(run_copy) == before


def test_a_new_run_refused_at_its_first_batches_leaves_no_directory(digits_root, tmp_path):
    data = other_digits(digits_root, tmp_path / "data", changed=False)
    corrupt_every_sample(data / "train")
    overrides = smoke_overrides(data, tmp_path / "runs", "new", "data.loader.in_memory_max_mb=0")
    launch = [sys.executable, "-m", "ddp.launch", "--standalone", "--nproc-per-node=2"]
    out = harness.run([*launch, "-m", "ddp.train", *overrides, "logger=wandb"], timeout=120)
    assert_refused(out, "shard-0000")
    assert not (tmp_path / "runs" / "new").exists()


def test_a_cache_too_small_for_a_shard_changes_nothing(digits_root, breaking_server, tmp_path):
    """A remote split's run, run again for one more epoch with a cache smaller than a
    shard: refused at its first fetch, the run as it was (the red team saw its plan
    record replaced and its summary deleted)."""
    runs, cache = tmp_path / "runs", f"data.remote.cache_dir={tmp_path / 'cache'}"
    url = f"data.root={breaking_server.url}/digits"
    remote = smoke_overrides(digits_root, runs, "web", url, cache)
    first = harness.train([*remote, "trainer.max_epochs=1"], nproc=0)
    assert first.returncode == 0, first.stderr[-3000:]
    before = snapshot(runs / "web")
    small = (
        f"data.remote.cache_dir={tmp_path / 'small'}",
        "data.remote.cache_max_gb=0.0001",
    )  # empty
    out = harness.train([*remote, "trainer.max_epochs=2", *small], nproc=0)
    assert_refused(out, "does not fit", "data.remote.cache_max_gb=0.0001")
    assert snapshot(runs / "web") == before


def test_an_unwritable_cache_directory_is_one_line(digits_root, tmp_path):
    """Before any request: a cache directory that cannot be made (here, under a file)."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    overrides = smoke_overrides(
        digits_root, tmp_path / "runs", "x", "data.root=http://127.0.0.1:9/data",
        f"data.remote.cache_dir={blocker / 'cache'}",
    )  # fmt: skip
    out = harness.train(overrides, nproc=0)
    assert_refused(out, "data.remote.cache_dir=", "give a writable directory")
    assert "Error executing job" not in out.stderr
    assert not (tmp_path / "runs" / "x").exists()


# ---------------------------------------------------------------- a finished run


def test_a_finished_run_run_again_does_nothing(digits_root, run_copy):
    before = snapshot(run_copy)
    out = again(digits_root, run_copy)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{run_copy}: this run is finished (it has trained trainer.max_epochs=2" in out.stdout
    assert "batch plan" not in out.stdout
    assert snapshot(run_copy) == before


def test_a_finished_run_given_more_epochs_trains_them(digits_root, run_copy):
    out = again(digits_root, run_copy, "trainer.max_epochs=3")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "continuing at epoch 2 step 0" in out.stdout
    assert [r["epoch"] for r in harness.records(run_copy, "val")] == [0, 1, 2]


def test_a_run_the_plateau_stopped_stays_stopped_unless_its_settings_change(digits_root, tmp_path):
    """The plateau stops it at epoch 1 (no improvement of 1.0 in accuracy); the same
    command again does nothing; a longer patience trains on, under the new settings."""
    plateau = ["plateau.warmup_epochs=0", "plateau.patience=0", "plateau.min_delta=1.0"]
    overrides = smoke_overrides(digits_root, tmp_path, "flat", "trainer.max_epochs=4", *plateau)
    first = harness.train(overrides, nproc=0)
    assert first.returncode == 0, first.stderr[-3000:]
    assert harness.records(tmp_path / "flat", "summary")[-1]["stop_reason"] == "plateau"
    before = snapshot(tmp_path / "flat")
    out = harness.train(overrides, nproc=0)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "this run is finished (the plateau tracker stopped it at epoch 1)" in out.stdout
    assert snapshot(tmp_path / "flat") == before
    longer = harness.train([*overrides, "plateau.patience=1"], nproc=0)
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "note: plateau.* changed since the plateau tracker stopped" in longer.stdout
    assert [r["epoch"] for r in harness.records(tmp_path / "flat", "val")] == [0, 1, 2]


# ---------------------------------------------------------------- one line per job


def test_a_refusal_found_by_every_rank_is_one_line(digits_root, tmp_path):
    """Three processes find the same bad global batch before any process group: one
    `error:` line, whole, then the launcher's."""
    overrides = smoke_overrides(digits_root, tmp_path, "bad", "batch.global_size=7")
    launch = [sys.executable, "-m", "ddp.launch", "--standalone", "--nproc-per-node=3"]
    out: subprocess.CompletedProcess = harness.run([*launch, "-m", "ddp.train", *overrides])
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if "error:" in line]
    assert lines == [lines[0]] and lines[0].startswith("error: batch.global_size=7"), lines
    assert not (tmp_path / "bad").exists()
