"""The SLURM path for real, on the one-node cluster of slurm/cluster.sh: sbatch +
srun + torchrun, preemption and requeue, Hydra's submitit launcher.

Skipped (with the reason) when no cluster answers sinfo. DDP_TEST_SLURM=1 lets
the session start one (root only); DDP_TEST_SLURM=0 skips these tests.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from tests import harness
from tests.fixtures import smoke_overrides
from tests.slurm_helpers import TRAIN_SBATCH, Job, cluster_sh, ensure_cluster, sbatch

# One xdist worker runs the cluster tests (conftest.CLUSTER_MODULES).
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.xdist_group("cluster")]


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    reason = ensure_cluster()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def jobs(slurm_cluster):
    """Submitted jobs, cancelled at the end of the test whatever happened."""
    submitted: list[Job] = []
    yield submitted
    for job in submitted:
        job.cancel()


def train_args(digits_root: Path, run_root: Path, *extra: str) -> list[str]:
    """The smoke run with a W&B run and no early stop, in run_root/slurm-<job id>."""
    return smoke_overrides(digits_root, run_root, None, "logger=wandb", "plateau=none", *extra)


def submit(jobs: list[Job], tmp_path: Path, args: list[str], *sbatch_args: str) -> Job:
    job = sbatch(
        TRAIN_SBATCH,
        args,
        tmp_path / "logs",
        *sbatch_args,
        DDP_PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
    )
    jobs.append(job)
    return job


def model_state(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    return ckpt["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"tensors differ: {differ}"


def wandb_run(run_dir: Path) -> dict:
    """The `run` record of the (last) offline W&B run under run_dir."""
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert offline, f"no offline W&B run under {run_dir}"
    out = harness.wandb_inspect(offline[-1])
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    return next(r["run"] for r in records if r["type"] == "run")


TEN_EPOCHS = "trainer.max_epochs=10"
"""Long enough for a preemption signal to land mid-run."""


@pytest.fixture(scope="module")
def reference(slurm_cluster, digits_root, tmp_path_factory):
    """A 10-epoch job on one CPU, left alone: the uninterrupted run that preempted jobs are
    compared with. First asked for by the preemption test, so that both run at once on the
    2-CPU node; cancelled at the end of the module whatever happened."""
    submitted: list[Job] = []
    run_root = tmp_path_factory.mktemp("reference")
    args = train_args(digits_root, run_root / "runs", TEN_EPOCHS)
    yield submit(submitted, run_root, args, "--cpus-per-task=1", "--job-name=reference")
    for job in submitted:
        job.cancel()


def reference_dir(job: Job) -> Path:
    """ROOT/runs/slurm-<job id>, beside the job's ROOT/logs."""
    return job.log.parent.parent / "runs" / f"slurm-{job.id}"


def test_preempted_job_requeues_and_matches_uninterrupted(
    slurm_cluster, jobs, reference, tmp_path, digits_root
):
    """USR1 to the batch shell: checkpoint, exit 75, requeue, resume, same final weights."""
    args = train_args(digits_root, tmp_path / "runs", TEN_EPOCHS)
    # One CPU each: both jobs run at once on the 2-CPU node (gloo does not care).
    preempted = submit(jobs, tmp_path, args, "--cpus-per-task=1", "--job-name=preempted")

    preempted.wait_for_log(r"^epoch 0:", timeout=300)
    preempted.signal("USR1", "--batch")
    preempted.wait_for_log(r"requeueing job", timeout=120)

    assert reference.wait(timeout=300) == "COMPLETED", reference.describe()
    assert preempted.wait(timeout=300) == "COMPLETED", preempted.describe()
    info, log = preempted.info(), preempted.log_text()
    assert info["Restarts"] == "1", preempted.describe()
    assert info["ExitCode"] == "0:0", preempted.describe()
    assert re.search(r"exited with 75 \(preempted\)", log), log  # ddp.launch: the workers' 75
    assert re.search(r"continuing at epoch \d+ step \d+ from .*last\.pt", log), log

    run_dir = tmp_path / "runs" / f"slurm-{preempted.id}"
    assert_same_weights(model_state(reference_dir(reference)), model_state(run_dir))
    # The requeued job continued the same W&B run.
    ids = {p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert len(ids) == 1, ids


def test_sbatch_trains_to_completion(reference):
    job = reference  # a plain sbatch job, never signalled
    assert job.wait(timeout=300) == "COMPLETED", job.describe()
    info = job.info()
    assert info["ExitCode"] == "0:0", job.describe()
    log = job.log_text()
    assert re.search(r"iterations per epoch\s+\d+", log), log
    assert "2 process(es)" in log, log
    # The run directory is keyed by the job id: a requeue finds it again.
    run_dir = reference_dir(job)
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert (run_dir / "metrics.jsonl").is_file()
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline W&B run"


def test_scancel_full_usr1_also_requeues(slurm_cluster, jobs, tmp_path, digits_root):
    """`scancel --signal=USR1 --full`: batch shell, agents and workers all get USR1 at once."""
    job = submit(jobs, tmp_path, train_args(digits_root, tmp_path / "runs", TEN_EPOCHS))

    job.wait_for_log(r"^epoch 0:", timeout=300)
    job.signal("USR1", "--full")

    assert job.wait(timeout=300) == "COMPLETED", job.describe()
    assert job.info()["Restarts"] == "1", job.describe()
    log = job.log_text()
    assert re.search(r"exited with 75 \(preempted\)", log) and re.search(
        r"continuing at epoch \d+ step \d+ from .*last\.pt", log
    ), log
    assert re.search(r"^epoch 9:", log, re.MULTILINE), log


def test_submitit_sweep_groups_runs(slurm_cluster, tmp_path, digits_root):
    """`ddp-train -m ... hydra/launcher=slurm`: one job per point, one W&B group."""
    run_root = tmp_path / "runs"
    proc = harness.run(
        [
            sys.executable,
            "-m",
            "ddp.train",
            "-m",
            "batch.global_size=64,128",
            "hydra/launcher=slurm",
            *train_args(digits_root, run_root),  # 2 epochs
        ],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (sweep_dir,) = run_root.glob("sweep-*")
    points = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in points] == ["0", "1"], points
    for point in points:
        assert (point / "checkpoints" / "last.pt").is_file(), point
    runs = [wandb_run(p) for p in points]
    groups = {r.get("run_group") for r in runs}
    assert len(groups) == 1 and None not in groups and "" not in groups, runs
    assert runs[0]["run_id"] != runs[1]["run_id"]
    # Two SLURM jobs (array tasks), each with its own log.
    assert len(list((sweep_dir / ".submitit").glob("*_*/*_log.out"))) == 2


def test_cluster_start_is_idempotent(slurm_cluster):
    """A second `start` finds everything running and changes nothing."""
    conf = Path("/etc/slurm/slurm.conf")
    if os.geteuid() != 0 or "managed by ddp slurm/cluster.sh" not in conf.read_text():
        pytest.skip("needs root and the cluster made by slurm/cluster.sh")
    proc = cluster_sh("start", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "slurmctld already running" in proc.stdout, proc.stdout
    assert "slurmd already running" in proc.stdout, proc.stdout
    assert "writing" not in proc.stdout, proc.stdout
