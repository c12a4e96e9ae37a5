"""launch/local.sh and launch/multinode.sh for real: torchrun, gloo, the trainer."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests import harness
from tests.harness import ROOT, env

pytestmark = pytest.mark.slow

LAUNCH = ROOT / "launch"


def launch_env() -> dict[str, str]:
    # Not inside a SLURM job as far as the trainer can tell: the run directory
    # must come from the torchrun run id, not from an outer SLURM_JOB_ID.
    out = {k: v for k, v in env().items() if not k.startswith("SLURM_")}
    out["DDP_PYTHON"] = sys.executable
    return out


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    """Output of `proc`; its whole process group is killed on timeout or after it ends."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        harness.kill_tree(proc.pid)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s:\n{out}") from None
    finally:
        try:
            harness.kill_tree(proc.pid)
        except ProcessLookupError:
            pass
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(digits_root: Path, run_root: Path, *extra: str) -> list[str]:
    return [
        f"data.root={digits_root}",
        f"run.root={run_root}",
        "trainer.max_epochs=2",
        "trainer.progress=false",
        "model=mlp",
        "logger.wandb.mode=offline",
        *extra,
    ]


def test_two_agents_rendezvous_into_one_job(tmp_path, digits_root):
    """Two torchrun agents ("nodes") of one process each meet at a c10d rendezvous."""
    port, run_id = free_port(), f"t{uuid.uuid4().hex[:8]}"
    args = overrides(digits_root, tmp_path)
    agents = [
        start(
            [
                str(LAUNCH / "multinode.sh"),
                "--head",
                f"127.0.0.1:{port}",
                "--nnodes",
                "2",
                "--nproc",
                "1",
                "--run-id",
                run_id,
                "--",
                *args,
            ]
        )
        for _ in range(2)
    ]
    outs = [finish(a) for a in agents]
    for agent, out in zip(agents, outs, strict=True):
        assert agent.returncode == 0, out
    both = "\n".join(outs)
    # One job of world size 2 (the plan is printed by rank 0 only, on one agent).
    assert re.search(r"^world size\s+2$", both, re.MULTILINE), both
    assert len(re.findall(r"^done\b", both, re.MULTILINE)) == 1, both
    run_dir = tmp_path / f"torchrun-{run_id}"
    assert [p.name for p in tmp_path.iterdir()] == [run_dir.name]
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert (run_dir / "metrics.jsonl").is_file()


def test_local_launcher_runs_n_processes(tmp_path, digits_root):
    proc = start(
        [str(LAUNCH / "local.sh"), "2", *overrides(digits_root, tmp_path, "run.name=local")]
    )
    out = finish(proc)
    assert proc.returncode == 0, out
    assert re.search(r"^world size\s+2$", out, re.MULTILINE), out
    assert (tmp_path / "local" / "checkpoints" / "last.pt").is_file()


def test_multinode_requires_head_and_run_id():
    proc = start([str(LAUNCH / "multinode.sh"), "--nnodes", "2"])
    out = finish(proc, timeout=30)
    assert proc.returncode == 2
    assert "--head HOST:PORT is required" in out
