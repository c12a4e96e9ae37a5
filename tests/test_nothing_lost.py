"""Nothing lost, ever: a refused start touches nothing, running the same command again
continues the run, one job owns a run directory, and the exit code says what happened.

Every refusal is checked three ways: the exit code (2), one line on stderr naming the
culprit (no traceback), and every file of the existing run byte-identical afterwards
(hashed before and after).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ddp import checkpoint
from ddp.errors import ConfigError
from ddp.plan import make_plan
from ddp.resume import load_resume_point
from ddp.shards import index_split
from tests import harness
from tests.fixtures import as_v1, copy_split, smoke_overrides
from tests.refusals import again, assert_refused, error_lines, snapshot

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["model.hidden=[32]"], ["cannot resume", "last.pt", "size mismatch"]),
        (["optim=sgd"], ["cannot resume", "optimizer", "AdamW", "SGD"]),
        (["model._target_=ddp.models.NoSuchModel"], ["model: cannot build", "NoSuchModel"]),
        (["model.dropout=2.0"], ["model: cannot build", "dropout"]),  # a raising constructor
        (["trainer.no_such_key=1"], ["trainer.no_such_key"]),  # Hydra: an unknown key
        (["batch.global_size=many"], ["batch.global_size"]),  # Hydra: a wrong type
        (["batch.global_size=128"], ["cannot resume", "global_size was 64, now 128"]),
        (["trainer.resume=never"], ["already holds a run", "trainer.resume=never"]),
        (["plateau=reduce_lr"], ["cannot resume", "plateau.monitor"]),
        (["trainer.profile=[8,5]"], ["trainer.profile=[8, 5]", "START <= END"]),
        (["trainer.memory_snapshot=true"], ["trainer.memory_snapshot=true", "not on cpu"]),
    ],
    ids=lambda v: v[0] if isinstance(v, list) and v and "=" in v[0] else None,
)
def test_a_refused_resume_changes_nothing(digits_root, run_copy, extra, words):
    before = snapshot(run_copy)
    assert_refused(again(digits_root, run_copy, *extra), *words)
    assert snapshot(run_copy) == before


def test_a_checkpoint_of_another_model_is_refused(digits_root, run_copy, tmp_path):
    other = harness.train(
        smoke_overrides(digits_root, tmp_path, "cnn", "model=cnn", "trainer.max_steps=2"), nproc=0
    )
    assert other.returncode == 0, other.stderr[-3000:]
    shutil.copy(tmp_path / "cnn" / "checkpoints" / "last.pt", run_copy / "checkpoints" / "last.pt")
    before = snapshot(run_copy)
    assert_refused(again(digits_root, run_copy), "cannot resume", "last.pt")
    assert snapshot(run_copy) == before


def test_a_corrupt_checkpoint_is_named_without_unsafe_advice(digits_root, run_copy):
    last = run_copy / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    before = snapshot(run_copy)
    line = assert_refused(again(digits_root, run_copy), str(last), "corrupt")
    assert "weights_only" not in line
    assert snapshot(run_copy) == before


def test_resume_require_refuses_a_run_that_never_started(digits_root, tmp_path):
    out = again(digits_root, tmp_path / "runs" / "fresh", "trainer.resume=require")
    assert_refused(out, "trainer.resume=require", "last.pt")
    assert not (tmp_path / "runs" / "fresh").exists()  # no stub directory left behind


def test_a_bad_target_leaves_no_stub_directory(digits_root, tmp_path):
    out = again(digits_root, tmp_path / "runs" / "new", "model._target_=nope.Model")
    assert_refused(out, "model: cannot build", "nope.Model")
    assert not (tmp_path / "runs" / "new").exists()


def test_refusals_under_torchrun_exit_2_with_one_line(digits_root, run_copy):
    before = snapshot(run_copy)
    out = harness.train(smoke_overrides(digits_root, run_copy.parent, "done", "optim=sgd"))
    assert out.returncode == 1 and "exitcode  : 2" in out.stderr  # plain torchrun: always 1
    assert len(set(error_lines(out))) == 1
    assert_refused(again(digits_root, run_copy, "optim=sgd", nproc=2), "optimizer")  # ddp.launch
    assert snapshot(run_copy) == before


# ---------------------------------------------------------------- one job per directory


HOLD_LOCK = """
import sys, time
from pathlib import Path
from ddp.run_dir import RunLock
lock = RunLock.acquire(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def lock_held(run_dir: Path):
    """Another job's rank 0 holding the run directory (a real lock, in another process)."""
    holder = harness.start([sys.executable, "-c", HOLD_LOCK, str(run_dir)])
    try:
        deadline = time.monotonic() + 60
        while "locked" not in (holder.popen.stdout.readline() or ""):
            assert time.monotonic() < deadline and holder.poll() is None, "no lock"
        yield holder
    finally:
        holder.kill()


@pytest.mark.parametrize("nproc", [0, 2], ids=["python", "torchrun"])
def test_a_second_job_on_a_run_directory_is_refused_naming_the_holder(digits_root, run_copy, nproc):
    with lock_held(run_copy) as holder:
        before = snapshot(run_copy)
        out = again(digits_root, run_copy, "trainer.max_epochs=3", nproc=nproc)  # more to do
        line = assert_refused(out, "is in use by another job", f"pid {holder.pid}")
        assert "host " in line
        assert snapshot(run_copy) == before


def test_a_killed_holder_leaves_no_stale_lock(digits_root, run_copy):
    with lock_held(run_copy) as holder:
        holder.popen.kill()  # SIGKILL: no chance to clean up
        holder.popen.wait()
        out = again(digits_root, run_copy, "trainer.max_epochs=3")  # a third epoch to train
    assert out.returncode == 0, out.stderr[-3000:]
    assert "continuing at epoch 2" in out.stdout


# ---------------------------------------------------------------- run it again


def test_running_the_same_command_again_continues_the_run(digits_root, tmp_path):
    """No run.name: the directory comes from the experiment and the overrides."""
    overrides = ["experiment=smoke", f"data.root={digits_root}", f"run.root={tmp_path}"]
    overrides.append("trainer.log_every_steps=1")  # how it runs, not what: the same name
    first = harness.train([*overrides, "trainer.max_steps=5"], nproc=0)
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith("smoke-") and "(new run)" in first.stdout
    # The same command (max_steps aside, which only ends this attempt early) continues.
    interrupted = snapshot(run_dir)
    second = harness.train([*overrides, "trainer.max_steps=9"], nproc=0)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{run_dir} (continuing at epoch 0 step 5" in second.stdout
    assert interrupted != snapshot(run_dir)
    assert [r["step"] for r in harness.records(run_dir, "train")] == list(range(1, 10))


# ---------------------------------------------------------------- exit codes from launchers


def local_sh(*args: str, nproc: int = 2) -> list[str]:
    return [str(harness.ROOT / "launch" / "local.sh"), str(nproc), *args]


def launch_env() -> dict[str, str]:
    return {"DDP_PYTHON": sys.executable}


def test_launch_scripts_pass_the_workers_exit_code(digits_root, run_copy):
    before = snapshot(run_copy)
    overrides = smoke_overrides(digits_root, run_copy.parent, run_copy.name, "optim=sgd")
    out = harness.run(local_sh(*overrides), timeout=120, unset=("SLURM_",), **launch_env())
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "ChildFailedError" not in out.stderr
    assert "[ddp.launch] rank" in out.stderr and "exited with 2 (bad input)" in out.stderr
    assert snapshot(run_copy) == before


UNTIL_SIGNALLED = ("plateau=none", "trainer.max_epochs=100000")
"""A run a signal must interrupt: no plateau stop, more epochs than any machine finishes
before the signal (the digits smoke run's 21 epochs take about a second)."""


def test_preemption_through_local_sh_exits_75(digits_root, tmp_path):
    overrides = smoke_overrides(
        digits_root, tmp_path, "pre", *UNTIL_SIGNALLED, "trainer.checkpoint.every_steps=5"
    )
    job = harness.start(local_sh(*overrides), unset=("SLURM_",), **launch_env())
    job.wait_for_file(tmp_path / "pre" / "checkpoints" / "last.pt")
    job.worker(1).send_signal(signal.SIGUSR1)
    out = job.finish(timeout=120)
    assert out.returncode == 75, out.stderr[-3000:]
    assert "exited with 75 (preempted)" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("launcher", ["python", "local.sh"])
def test_ctrl_c_checkpoints_at_a_step_boundary_and_exits_130(digits_root, tmp_path, launcher):
    overrides = smoke_overrides(digits_root, tmp_path, "int", *UNTIL_SIGNALLED)
    if launcher == "python":
        cmd = harness.trainer(overrides, nproc=0)
    else:
        cmd = local_sh(*overrides)
    job = harness.start(cmd, unset=("SLURM_",), **launch_env())
    job.wait_for_record(tmp_path / "int", "val")  # into the first epochs
    job.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends the launcher
    out = job.finish(timeout=120)
    assert out.returncode == 130, out.stdout[-2000:] + out.stderr[-3000:]
    state = checkpoint.load(tmp_path / "int" / "checkpoints" / "last.pt")
    assert state["position"]["global_step"] > 0
    stopped_at = state["position"]["global_step"]
    again_out = harness.train([*overrides, f"trainer.max_steps={stopped_at + 3}"], nproc=0)
    assert again_out.returncode == 0, again_out.stderr[-3000:]
    assert "(continuing at" in again_out.stdout


# ---------------------------------------------------------------- data that must not train


def test_a_shard_the_manifest_does_not_list_is_refused(digits_root, tmp_path):
    data = tmp_path / "data"
    copy_split(digits_root / "train", data / "train")
    copy_split(digits_root / "val", data / "val")
    shutil.copy(data / "train" / "shard-000000.tar", data / "train" / "extra.tar")
    out = harness.train(
        smoke_overrides(digits_root, tmp_path / "runs", "x", f"data.root={data}"), nproc=0
    )
    assert_refused(out, "extra.tar", "does not list", "ddp-shards index")


def with_label(data: Path, sample: int, label: int) -> str:
    """Give one training sample of a copy of digits another label (its tar rewritten and
    re-indexed, as a user's tools would); return its key."""
    split = data / "train"
    path = split / "shard-000000.tar"
    members = []
    with tarfile.open(path) as tar:
        for info in tar.getmembers():
            members.append((info, tar.extractfile(info).read()))
    key = sorted({info.name.split(".")[0] for info, _ in members})[sample]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, payload in members:
            if info.name == f"{key}.cls":
                payload = str(label).encode()
                info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    index_split(split)
    return key


@pytest.fixture
def mislabelled(digits_root: Path, tmp_path: Path) -> tuple[Path, str]:
    data = tmp_path / "data"
    copy_split(digits_root / "train", data / "train")
    copy_split(digits_root / "val", data / "val")
    return data, with_label(data, 3, 12)


def test_a_label_outside_the_models_classes_is_refused_at_start_up(digits_root, mislabelled):
    data, key = mislabelled
    overrides = smoke_overrides(digits_root, data.parent / "runs", "x", f"data.root={data}")
    out = harness.train(overrides, nproc=0)
    line = assert_refused(out, "shard-000000.tar", f"key {key}", "label 12", "[0, 10)")
    assert "model.num_classes=10" in line
    assert "batch plan" not in out.stdout


def test_a_label_outside_the_classes_is_named_when_the_manifest_has_no_ranges(
    digits_root, mislabelled
):
    """A (v1) manifest written before label ranges were recorded: found in the batch."""
    data, key = mislabelled
    as_v1(data / "train", label_ranges=False)
    overrides = smoke_overrides(digits_root, data.parent / "runs", "x", f"data.root={data}")
    out = harness.train([*overrides, "data.loader.in_memory_max_mb=0"], nproc=0)
    assert_refused(out, "shard-000000.tar", f"key {key}", "label 12 is outside [0, 10)")


def test_a_label_outside_the_classes_is_skipped_with_on_error_skip(digits_root, mislabelled):
    data, _ = mislabelled
    overrides = smoke_overrides(
        digits_root, data.parent / "runs", "x", f"data.root={data}", "data.loader.on_error=skip"
    )
    out = harness.train([*overrides, "trainer.max_epochs=1"], nproc=0)
    assert out.returncode == 0, out.stderr[-3000:]
    (epoch,) = harness.records(data.parent / "runs" / "x", "val")
    assert epoch["data/skipped_samples"] == 1


# ---------------------------------------------------------------- a full or read-only disk


@contextlib.contextmanager
def mounted(args: list[str], target: Path):
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_a_read_only_run_root_is_one_line(digits_root, tmp_path):
    root = tmp_path / "ro"
    with mounted(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"], root):
        out = harness.train(smoke_overrides(digits_root, root, "x"), nproc=0)
    assert_refused(out, str(root), "Read-only file system")


def test_a_full_disk_mid_run_stops_with_one_line_and_keeps_the_last_checkpoint(
    digits_root, tmp_path
):
    root = tmp_path / "small"
    with mounted(["-t", "tmpfs", "-o", "size=80m", "tmpfs"], root):
        overrides = smoke_overrides(
            digits_root,
            root,
            "x",
            "trainer.max_epochs=40",
            "trainer.checkpoint.every_steps=2",
            "trainer.log_every_steps=1",
        )
        job = harness.start(harness.trainer(overrides, nproc=0))
        last = root / "x" / "checkpoints" / "last.pt"
        job.wait_for_file(last)  # step 2's
        job.wait_for_record(root / "x", "train", 3)  # the run goes on past it
        filler = root / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True)
        out = job.finish(timeout=120)
        lines = error_lines(out)
        assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
        assert lines and "No space left on device" in lines[0], out.stderr[-3000:]
        assert "Traceback" not in out.stderr
        assert checkpoint.load(last)["position"]["global_step"] > 0  # intact and loadable
        for line in (root / "x" / "metrics.jsonl").read_text().splitlines():
            json.loads(line)  # never a torn line
        filler.unlink()


def test_a_checkpoint_that_fills_the_disk_says_so_and_keeps_the_last_one(tmp_path):
    """Wherever the disk fills during a write, the error is the OSError (ENOSPC), not
    torch's "unexpected pos" (its zip writer swallows the write's error), no temporary
    file is left, and the checkpoint before is intact."""
    root = tmp_path / "small"
    state = {"weights": torch.randn(50_000), "step": 7}  # 200 kB
    with mounted(["-t", "tmpfs", "-o", "size=1m", "tmpfs"], root):
        last = root / "last.pt"
        checkpoint.atomic_save({"step": 6}, last)
        before = last.read_bytes()
        free = shutil.disk_usage(root).free
        for room in range(0, 160_000, 7_919):  # bytes left for the write
            filler = root / "filler"
            filler.write_bytes(b"\0" * (free - room - 8192))
            with pytest.raises(OSError) as caught:
                checkpoint.atomic_save(state, last)
            assert caught.value.errno == errno.ENOSPC, (room, caught.value)
            assert sorted(p.name for p in root.iterdir()) == ["filler", "last.pt"]
            assert last.read_bytes() == before
            filler.unlink()


SECOND_CTRL_C = """
import signal
from ddp.state import StopRequest
stop = StopRequest()
signal.raise_signal(signal.SIGINT)
print("asked to stop:", stop.interrupt, flush=True)
signal.raise_signal(signal.SIGINT)
print("still running", flush=True)
"""


def test_a_second_ctrl_c_stops_at_once():
    out = harness.run([sys.executable, "-c", SECOND_CTRL_C], timeout=60)
    assert "asked to stop: True" in out.stdout  # the first: stop at the next step boundary
    assert out.returncode == -signal.SIGINT and "still running" not in out.stdout


@pytest.mark.parametrize(
    ("saved", "now", "words"),
    [
        (
            {"data": {"window_shards": None}},
            {"data.window_shards": 4},
            "window_shards was None, now 4",
        ),
        ({}, {"data.window_shards": 2}, "window_shards was None, now 2"),  # before the key
        ({"trainer": {"seed": 1}}, {"trainer.seed": 2}, "trainer.seed was 1, now 2"),
    ],
)
def test_a_resume_mid_epoch_in_another_order_is_refused(tmp_path, saved, now, words):
    """Mid-epoch, another seed or window size would repeat some samples and skip others;
    at an epoch's end it is a new order for a new epoch; with restart_epoch_on_plan_change
    the epoch starts over. Reads only."""
    plan = make_plan(1000, 64, 32, 2)
    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.pt"

    def write(step: int) -> None:
        position = {"epoch": 3, "step_in_epoch": step, "epoch_sums": {"loss": 1.0}}
        state = {"plan": plan.as_dict(), "position": position, "config": saved}
        checkpoint.atomic_save({"format": checkpoint.FORMAT, **state}, last)

    trainer = SimpleNamespace(resume="auto", restart_epoch_on_plan_change=False)
    write(step=5)
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=f"cannot resume {last}: .*{words}"):
        load_resume_point(tmp_path, trainer, plan, now)
    assert snapshot(tmp_path) == before
    trainer.restart_epoch_on_plan_change = True
    assert load_resume_point(tmp_path, trainer, plan, now)["position"]["step_in_epoch"] == 0
    trainer.restart_epoch_on_plan_change = False
    write(step=0)
    assert load_resume_point(tmp_path, trainer, plan, now)["position"]["epoch"] == 3
