"""Faults without loss: resume, preemption, NaNs, dead peers, bad start-up input.

Every test runs the real trainer under torchrun (2 processes, gloo) and injects
the fault from outside, as a cluster would: SIGKILL, SIGUSR1, SIGSTOP.
"""

from __future__ import annotations

import contextlib
import random
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

from ddp import checkpoint
from ddp.errors import CheckpointError
from tests import harness
from tests.fixtures import smoke_overrides
from tests.harness import records

pytestmark = pytest.mark.slow


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


def noise_scales(run_dir: Path) -> list[float]:
    return [r["batch/noise_scale"] for r in records(run_dir, "val")]


def job_overrides(digits_root: Path, run_root: Path, name: str, *extra: str) -> list[str]:
    """A short digits job with dropout (so RNG state matters), checkpointed every 3 steps,
    every step in metrics.jsonl: 4 epochs of 23 iterations, no early stop, a W&B run."""
    return smoke_overrides(
        digits_root,
        run_root,
        name,
        "logger=wandb",
        "model.dropout=0.2",
        "trainer.max_epochs=4",
        "plateau=none",
        "trainer.log_every_steps=1",
        "trainer.checkpoint.every_steps=3",
        "batch.global_size=64",
        "batch.micro_size=16",
        *extra,
    )


@pytest.fixture
def job(digits_root, tmp_path):
    """Overrides for the job as run `name` in tmp_path."""
    return lambda name, *extra: job_overrides(digits_root, tmp_path, name, *extra)


@pytest.fixture(scope="module")
def reference(digits_root, tmp_path_factory):
    """The job run once without a fault, for the tests that compare against it. It trains in
    the background while the first of them runs its own job; `reference()` waits for it
    and is its run directory."""
    run_root = tmp_path_factory.mktemp("reference")
    run = harness.start(harness.trainer(job_overrides(digits_root, run_root, "reference")))

    def finished() -> Path:
        out = run.finish()
        assert out.returncode == 0, out.stderr[-3000:]
        return run_root / "reference"

    yield finished
    run.kill()


def test_sigkill_mid_epoch_resumes_bitwise_equal(job, reference, tmp_path):
    run_dir = tmp_path / "killed"
    job_run = harness.start(harness.trainer(job("killed"), torchrun_args=["--max-restarts=2"]))
    job_run.wait_for_file(run_dir / "checkpoints" / "last.pt")  # step 3's
    job_run.wait_for_record(run_dir, "train", 4)  # past that checkpoint, in epoch 0 or 1
    job_run.worker(rank=1).kill()
    out = job_run.finish()
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(continuing at epoch" in out.stdout
    assert_bitwise_equal(final_weights(run_dir), final_weights(reference()))
    # The metrics file holds every step once, as the uninterrupted run's does.
    assert train_steps(run_dir) == train_steps(reference()) == list(range(1, 4 * 23 + 1))
    ids = {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert len(ids) == 1  # the restarted job continued the same W&B run


def test_preemption_signal_on_one_rank_checkpoints_exits_and_resumes(job, reference, tmp_path):
    run_dir = tmp_path / "preempted"
    job_run = harness.start(harness.trainer(job("preempted")))
    job_run.wait_for_file(run_dir / "checkpoints" / "last.pt")
    job_run.worker(rank=1).send_signal(signal.SIGUSR1)
    out = job_run.finish()
    assert "preempted" in out.stdout and "exitcode  : 75" in out.stderr
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert 0 < state["position"]["global_step"] < 4 * 23

    again = harness.train(job("preempted"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert_bitwise_equal(final_weights(run_dir), final_weights(reference()))
    assert train_steps(run_dir) == list(range(1, 4 * 23 + 1))
    # The resumed epoch's train loss/accuracy are the uninterrupted run's: the epoch sums
    # carried in the checkpoint are over all ranks, counted once. So is its noise scale
    # (its norms' sums too; added in another order, hence approx).
    assert epoch_metrics(run_dir) == epoch_metrics(reference())
    assert noise_scales(run_dir) == pytest.approx(noise_scales(reference()), rel=1e-9)


def test_sigterm_single_process_exits_75_with_checkpoint(job, tmp_path):
    run_dir = tmp_path / "single"
    job_run = harness.start(harness.trainer(job("single"), nproc=0))
    job_run.wait_for_file(run_dir / "checkpoints" / "last.pt")
    job_run.send_signal(signal.SIGTERM)
    out = job_run.finish()
    assert out.returncode == 75, out.stderr[-3000:]
    # The checkpoint is the stop's own: at the last step done (each is in metrics.jsonl),
    # not only the periodic one before it.
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert 0 < state["position"]["global_step"] == train_steps(run_dir)[-1] < 4 * 23


def test_elastic_resume_keeps_global_batch_and_position(job, tmp_path):
    first = harness.train(job("elastic", "trainer.max_steps=30"))
    assert first.returncode == 0, first.stderr[-3000:]
    # One process now: accumulation doubles, the global batch and sample position stay.
    again = harness.train(job("elastic"), nproc=1)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "accumulation                      4" in again.stdout
    assert "(continuing at epoch 1 step 7" in again.stdout
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


SAVE_IN_A_LOOP = """
import sys
from pathlib import Path

import torch

from ddp.checkpoint import FORMAT, BackgroundWriter, atomic_save

path, first_saved, background = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
writer = BackgroundWriter()  # one writer
save = writer.save if background else atomic_save
big = {"format": FORMAT, "model": {"w": torch.randn(4_000_000)}, "step": 0}
save(big, path)
writer.wait()
first_saved.touch()  # a checkpoint is on disk: from now on, every kill lands in a later save
for step in range(1, 10**9):
    big["step"] = step
    save(big, path)
"""


def save_in_a_loop(path: Path, first_saved: Path, background: bool) -> harness.Running:
    args = [str(path), str(first_saved), str(int(background))]
    return harness.start([sys.executable, "-c", SAVE_IN_A_LOOP, *args])


@pytest.mark.parametrize("background", [False, True], ids=["atomic_save", "BackgroundWriter"])
def test_a_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path, background):
    delays = (0.0, 0.03, 0.07, 0.12, 0.2)  # saves take ~50-100 ms: kills land at varied instants
    paths = [tmp_path / f"{i}.pt" for i in range(len(delays))]
    # Started at once (their interpreters start up side by side), killed one by one, each
    # only once its first checkpoint is on disk.
    writers = [save_in_a_loop(path, path.with_suffix(".first"), background) for path in paths]
    for writer, path, delay in zip(writers, paths, delays, strict=True):
        writer.wait_for_file(path.with_suffix(".first"), timeout=120)
        time.sleep(delay)
        writer.kill()
        assert checkpoint.load(path)["model"]["w"].numel() == 4_000_000


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
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*file/last.pt"):
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
from ddp.distributed.exit import exit_process
from ddp.checkpoint import BackgroundWriter, FORMAT
state = {{"format": FORMAT, "w": torch.randn(20_000_000)}}
BackgroundWriter().save(state, Path({str(tmp_path / "last.pt")!r}))
exit_process(1)  # an error elsewhere: no wait(), straight to os._exit
"""
    out = harness.run([sys.executable, "-c", script], timeout=120)
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
    """Rank 1 stopped (SIGSTOP): rank 0 gives up after trainer.timeout_s with one line and
    exit 4; torch's agent ends rank 1 (SIGTERM, then SIGKILL 30 s later); the launcher
    names rank 1 as the cause."""
    # No W&B start on rank 0 (a thread importing wandb): on a loaded machine it delayed
    # rank 0 past the 5 s timeout in a start-up collective, before any peer was stopped.
    overrides = job(
        "stuck", "logger=none", "trainer.timeout_s=5", "plateau=none", "trainer.max_epochs=100000"
    )
    launch = [sys.executable, "-m", "ddp.launch", "--standalone", "--nproc-per-node=2"]
    job_run = harness.start([*launch, "-m", "ddp.train", *overrides])
    job_run.wait_for_file(tmp_path / "stuck" / "checkpoints" / "last.pt")
    job_run.worker(rank=1).suspend()  # SIGSTOP; the harness's SIGKILL ends it
    t0 = time.monotonic()
    out = job_run.finish(timeout=90)
    assert time.monotonic() - t0 < 60
    assert out.returncode == 128 + signal.SIGKILL, out.stderr[-3000:]
    host = socket.gethostname()
    (lost,) = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert lost.startswith(f"error: lost rank 1 on host {host} (no answer within "), lost
    assert "trainer.timeout_s=5" in lost  # the message says what happened
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"[ddp.launch] rank 1 (host {host}) stopped responding: rank 0 gave up on it (exit 4, "
        "peer lost), then it was killed by SIGKILL"
    ), out.stderr[-3000:]
    assert "Traceback" not in out.stderr


@contextlib.contextmanager
def mounted(args: list[str], target: Path):
    target.mkdir(parents=True, exist_ok=True)
    done = harness.run(["mount", *args, str(target)], timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")
    try:
        yield target
    finally:
        harness.run(["umount", "-l", str(target)], timeout=30)


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
        out = harness.run(harness.trainer(job("z"), nproc=0), timeout=60, **env)
    assert out.returncode == 2 and f"127.0.0.1:{port} is already in use" in out.stderr


def test_stale_temporaries_of_cut_writes_are_removed(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"kept")
    (tmp_path / ".last.pt.x1y2.tmp").write_bytes(b"half a write")
    checkpoint.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
