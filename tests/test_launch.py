"""launch/local.sh and launch/multinode.sh for real: torchrun, gloo, the trainer."""

from __future__ import annotations

import re
import sys
import uuid

import pytest

from tests import harness
from tests.distributed import free_port
from tests.fixtures import smoke_overrides
from tests.harness import ROOT

pytestmark = pytest.mark.slow

LAUNCH = ROOT / "launch"


def launch(*args: str) -> harness.Running:
    """A launch script, its stderr merged into its stdout. Not inside a SLURM job as far as
    the trainer can tell: the run directory must come from the torchrun run id, not from
    an outer SLURM_JOB_ID."""
    return harness.start(
        list(args), merge_stderr=True, unset=("SLURM_",), DDP_PYTHON=sys.executable
    )


def test_two_agents_rendezvous_into_one_job(tmp_path, digits_root):
    """Two torchrun agents ("nodes") of one process each meet at a c10d rendezvous."""
    port, run_id = free_port(), f"t{uuid.uuid4().hex[:8]}"
    args = smoke_overrides(digits_root, tmp_path, None)
    head = ["--head", f"127.0.0.1:{port}", "--nnodes", "2", "--nproc", "1", "--run-id", run_id]
    agents = [launch(str(LAUNCH / "multinode.sh"), *head, "--", *args) for _ in range(2)]
    outs = [agent.finish() for agent in agents]
    for out in outs:
        assert out.returncode == 0, out.stdout
    both = "\n".join(out.stdout for out in outs)
    # One job of world size 2 (the plan is printed by rank 0 only, on one agent).
    assert re.search(r"^world size\s+2$", both, re.MULTILINE), both
    assert len(re.findall(r"^done\b", both, re.MULTILINE)) == 1, both
    # Every rank of both nodes chose the same directory: the experiment and a hash of
    # the overrides that define the run (the same on every node).
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith("smoke-")
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert (run_dir / "metrics.jsonl").is_file()


def test_local_launcher_runs_n_processes(tmp_path, digits_root):
    args = smoke_overrides(digits_root, tmp_path, "local")
    out = launch(str(LAUNCH / "local.sh"), "2", *args).finish()
    assert out.returncode == 0, out.stdout
    assert re.search(r"^world size\s+2$", out.stdout, re.MULTILINE), out.stdout
    assert (tmp_path / "local" / "checkpoints" / "last.pt").is_file()


def test_multinode_requires_head_and_run_id():
    out = launch(str(LAUNCH / "multinode.sh"), "--nnodes", "2").finish(timeout=30)
    assert out.returncode == 2
    assert "--head HOST:PORT is required" in out.stdout
