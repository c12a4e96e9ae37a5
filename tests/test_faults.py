"""Faults without loss: resume, preemption, NaNs, dead peers, bad start-up input.

Every test runs the real trainer under torchrun (2 processes, gloo) and injects
the fault from outside, as a cluster would: SIGKILL, SIGUSR1, SIGSTOP.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ddp import checkpoint
from tests import harness
from tests.harness import ROOT, records

pytestmark = pytest.mark.slow


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def worker_pid(agent_pid: int, rank: int) -> int:
    """The torchrun worker process whose RANK is `rank`."""
    for pid in children(agent_pid):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker with RANK={rank} under {agent_pid}")


def start(overrides: list[str], torchrun_args=(), nproc: int = 2) -> subprocess.Popen:
    """The trainer under torchrun (nproc=0: plain python), running in the background."""
    launcher = harness.torchrun(nproc, *torchrun_args) if nproc else [sys.executable]
    cmd = [*launcher, "-m", "ddp.train", *overrides]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=harness.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 180) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        harness.kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"job did not end in {timeout}s\n{out}\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared: {finish(proc).stderr[-2000:]}")
        time.sleep(0.05)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in records(run_dir, "train")]


def epoch_metrics(run_dir: Path) -> list[tuple[float, float]]:
    return [(r["train/epoch_loss"], r["train/epoch_accuracy"]) for r in records(run_dir, "val")]


@pytest.fixture
def job(digits_root, tmp_path):
    """Overrides for a short digits job with dropout (so RNG state matters) in run `name`."""

    def overrides(name: str, *extra: str) -> list[str]:
        return [
            f"data.root={digits_root}",
            f"run.root={tmp_path}",
            f"run.name={name}",
            "model=mlp",
            "model.dropout=0.2",
            "trainer.max_epochs=4",
            "plateau=none",
            "trainer.log_every_steps=1",
            "trainer.checkpoint_every_steps=3",
            "batch.global_size=64",
            "batch.micro_size=16",
            *extra,
        ]

    return overrides


@pytest.fixture
def reference(job, tmp_path):
    out = harness.train(job("reference"))
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp_path / "reference"


def test_sigkill_mid_epoch_resumes_bitwise_equal(job, reference, tmp_path):
    run_dir = tmp_path / "killed"
    proc = start(job("killed"), torchrun_args=("--max-restarts=2",))
    wait_for(run_dir / "checkpoints" / "last.pt", proc)
    time.sleep(0.3)  # somewhere inside epoch 0 or 1, not at a checkpoint
    os.kill(worker_pid(proc.pid, rank=1), signal.SIGKILL)
    out = finish(proc)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed at epoch" in out.stdout
    assert_bitwise_equal(final_weights(run_dir), final_weights(reference))
    # The metrics file holds every step once, as the uninterrupted run's does.
    assert train_steps(run_dir) == train_steps(reference) == list(range(1, 4 * 23 + 1))
    ids = {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert len(ids) == 1  # the restarted job continued the same W&B run


def test_preemption_signal_on_one_rank_checkpoints_exits_and_resumes(job, reference, tmp_path):
    run_dir = tmp_path / "preempted"
    proc = start(job("preempted"))
    wait_for(run_dir / "checkpoints" / "last.pt", proc)
    os.kill(worker_pid(proc.pid, rank=1), signal.SIGUSR1)
    out = finish(proc)
    assert "preempted" in out.stdout and "exitcode  : 75" in out.stderr
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert 0 < state["position"]["global_step"] < 4 * 23

    again = harness.train(job("preempted"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert_bitwise_equal(final_weights(run_dir), final_weights(reference))
    assert train_steps(run_dir) == list(range(1, 4 * 23 + 1))
    # The resumed epoch's train loss/accuracy are the uninterrupted run's: the epoch sums
    # carried in the checkpoint are over all ranks, counted once.
    assert epoch_metrics(run_dir) == epoch_metrics(reference)


def test_sigterm_single_process_exits_75_with_checkpoint(job, tmp_path):
    proc = start(job("single"), nproc=0)
    wait_for(tmp_path / "single" / "checkpoints" / "last.pt", proc)
    proc.send_signal(signal.SIGTERM)
    assert finish(proc).returncode == 75


def test_elastic_resume_keeps_global_batch_and_position(job, tmp_path):
    first = harness.train(job("elastic", "trainer.max_steps=30"))
    assert first.returncode == 0, first.stderr[-3000:]
    # One process now: accumulation doubles, the global batch and sample position stay.
    again = harness.train(job("elastic"), nproc=1)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "accumulation                      4" in again.stdout
    assert "resumed at epoch 1 step 7" in again.stdout
    run_dir = tmp_path / "elastic"
    assert train_steps(run_dir) == list(range(1, 4 * 23 + 1))


def test_resume_that_changes_the_global_batch_is_refused(job, tmp_path):
    assert harness.train(job("changed", "trainer.max_steps=5")).returncode == 0
    out = harness.train(job("changed", "batch.global_size=128"), nproc=0)
    assert out.returncode == 2
    assert "cannot resume" in out.stderr and "global_size was 64, now 128" in out.stderr
    allowed = harness.train(
        job("changed", "batch.global_size=128", "trainer.restart_epoch_on_plan_change=true")
    )
    assert allowed.returncode == 0, allowed.stderr[-3000:]


def kill_mid_save_script(path: Path, background: bool) -> str:
    save = "BackgroundWriter().save" if background else "atomic_save"  # one writer
    return f"""
import torch
from pathlib import Path
from ddp.checkpoint import BackgroundWriter, atomic_save, FORMAT
big = {{"format": FORMAT, "model": {{"w": torch.randn(4_000_000)}}}}
save = {save}
i = 0
while True:
    big["step"] = i
    save(big, Path({str(path)!r}))
    i += 1
"""


@pytest.mark.parametrize("background", [False, True], ids=["atomic_save", "BackgroundWriter"])
def test_a_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path, background):
    path = tmp_path / "last.pt"
    script = kill_mid_save_script(path, background)
    for delay in (0.9, 1.1, 1.3, 1.6, 2.0):
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
        time.sleep(delay)  # saves take ~50-100 ms: the kill lands at varied instants
        proc.kill()
        proc.wait()
        if path.exists():
            assert checkpoint.load(path)["model"]["w"].numel() == 4_000_000
    assert path.exists()


def test_background_writes_keep_the_state_of_the_moment_of_saving(tmp_path):
    writer = checkpoint.BackgroundWriter()
    state = {"format": checkpoint.FORMAT, "model": {"w": torch.zeros(1000)}}
    writer.save(state, tmp_path / "last.pt", copies=(tmp_path / "best.pt",))
    state["model"]["w"] += 1  # training goes on while the thread writes
    writer.wait()
    for name in ("last.pt", "best.pt"):
        assert checkpoint.load(tmp_path / name)["model"]["w"].sum() == 0


def test_rng_state_travels_as_bytes_unchanged():
    torch.manual_seed(3)
    random.seed(4)
    before = checkpoint.rng_state()
    after = checkpoint.rng_state_from_bytes(checkpoint.rng_state_bytes())
    assert torch.equal(after["torch"], before["torch"]) and after["python"] == before["python"]
    checkpoint.set_rng_state(after)
    assert torch.rand(3).tolist() == (torch.manual_seed(3), torch.rand(3))[1].tolist()


def test_a_failed_background_write_is_raised_naming_the_file(tmp_path, capfd):
    (tmp_path / "file").write_text("not a directory")
    writer = checkpoint.BackgroundWriter()
    writer.save({"format": checkpoint.FORMAT}, tmp_path / "file" / "last.pt")
    with pytest.raises(checkpoint.CheckpointError, match="cannot write checkpoint .*file/last.pt"):
        writer.wait()
    writer.wait()  # reported once
    # A failure is reported by the next save, which is still tried (storage may recover).
    writer.save({"format": checkpoint.FORMAT}, tmp_path / "file" / "last.pt")
    writer.save({"format": checkpoint.FORMAT, "n": 2}, tmp_path / "ok" / "last.pt")
    writer.wait()
    assert checkpoint.load(tmp_path / "ok" / "last.pt")["n"] == 2
    assert "warning: cannot write checkpoint" in capfd.readouterr().err


def test_an_exit_without_wait_still_finishes_the_write_in_flight(tmp_path):
    script = f"""
import torch
from pathlib import Path
from ddp.dist.exit import exit_process
from ddp.checkpoint import BackgroundWriter, FORMAT
state = {{"format": FORMAT, "w": torch.randn(20_000_000)}}
BackgroundWriter().save(state, Path({str(tmp_path / "last.pt")!r}))
exit_process(1)  # an error elsewhere: no wait(), straight to os._exit
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1, out.stderr
    assert checkpoint.load(tmp_path / "last.pt")["w"].numel() == 20_000_000
    assert not list(tmp_path.glob(".*.tmp"))


def test_snapshots_keep_state_dict_metadata_and_namedtuples():
    from collections import namedtuple

    model = torch.nn.Linear(2, 2)
    pair = namedtuple("Pair", "a b")(torch.zeros(1), 2)
    copy = checkpoint._snapshot({"model": model.state_dict(), "pair": pair})
    assert copy["model"]._metadata == model.state_dict()._metadata
    assert type(copy["pair"]) is type(pair) and copy["pair"].b == 2


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_corrupt_or_foreign_checkpoint_is_refused(job, tmp_path, content):
    last = tmp_path / "bad" / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    if content is None:
        torch.save({"weights": torch.zeros(3)}, last)  # someone else's file
    else:
        last.write_bytes(content)
    out = harness.train(job("bad"), nproc=0, timeout=60)
    assert out.returncode == 2
    assert f"checkpoint {last}" in out.stderr


def poison_with_nan(payload: bytes) -> bytes:
    array = np.load(io.BytesIO(payload))
    array[...] = np.nan
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.fixture
def nan_root(digits_root, tmp_path):
    """A copy of digits where one training sample is NaN: only its rank sees the bad loss."""
    return harness.copy_shards(digits_root, tmp_path / "nan-digits", edit_first_npy=poison_with_nan)


def test_nonfinite_loss_on_one_rank_stops_every_rank(job, nan_root, tmp_path):
    out = harness.train([*job("nan"), f"data.root={nan_root}", "trainer.nonfinite=stop"])
    assert "error: non-finite loss at epoch 0 step" in out.stdout
    assert "exitcode  : 3" in out.stderr
    last = tmp_path / "nan" / "checkpoints" / "last.pt"
    if last.exists():
        assert not checkpoint.has_nonfinite(checkpoint.load(last)["model"])


def test_nonfinite_loss_can_skip_the_step(job, nan_root, tmp_path):
    out = harness.train(
        [*job("skip"), f"data.root={nan_root}", "trainer.nonfinite=skip", "trainer.max_epochs=2"]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = records(tmp_path / "skip", "summary")[-1]
    assert summary["skipped_steps"] == 2  # the NaN sample is in one global batch per epoch
    assert not checkpoint.has_nonfinite(final_weights(tmp_path / "skip"))


def test_a_stuck_peer_ends_the_job_within_the_timeout(job, tmp_path):
    proc = start(job("stuck", "trainer.timeout_s=5", "trainer.max_epochs=50"))
    wait_for(tmp_path / "stuck" / "checkpoints" / "last.pt", proc)
    stuck = worker_pid(proc.pid, rank=1)
    os.kill(stuck, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        out = finish(proc, timeout=90)
    finally:
        os.kill(stuck, signal.SIGCONT) if Path(f"/proc/{stuck}").exists() else None
    assert out.returncode != 0
    assert time.monotonic() - t0 < 60
    assert "trainer.timeout_s=5" in out.stderr  # the message says what happened


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


def test_an_unwritable_run_directory_is_reported_before_training(job, tmp_path):
    run_dir = tmp_path / "readonly"
    with mounted(["--bind", "-o", "ro", str(run_dir)], run_dir):
        out = harness.train(job("readonly"), nproc=0, timeout=60)
    assert out.returncode == 2
    assert f"error: run directory {run_dir} is not writable" in out.stderr


def test_a_full_run_directory_is_reported_before_training(job, tmp_path):
    with mounted(["-t", "tmpfs", "-o", "size=1m", "tmpfs"], tmp_path / "full"):
        out = harness.train(job("full/run"), nproc=0, timeout=60)
    assert out.returncode == 2
    assert "MiB free" in out.stderr and "full/run" in out.stderr


def test_a_missing_shard_is_named_before_training(job, digits_root, tmp_path):
    broken = tmp_path / "broken"
    for split in ("train", "val"):
        (broken / split).mkdir(parents=True)
        for f in (digits_root / split).iterdir():
            (broken / split / f.name).symlink_to(f)
    (broken / "train" / "shard-000002.tar").unlink()
    out = harness.train([*job("y"), f"data.root={broken}"], nproc=0, timeout=60)
    assert out.returncode == 2 and "shard-000002.tar" in out.stderr
    assert "batch plan" not in out.stdout


def test_a_port_in_use_is_named(job):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = dict(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        out = harness.run([sys.executable, "-m", "ddp.train", *job("z")], timeout=60, **env)
    assert out.returncode == 2 and f"127.0.0.1:{port} is already in use" in out.stderr


def test_stale_temporaries_of_cut_writes_are_removed(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"kept")
    (tmp_path / ".last.pt.x1y2.tmp").write_bytes(b"half a write")
    checkpoint.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
