"""launch/local.sh and launch/multinode.sh for real: torchrun, gloo, the trainer."""

from __future__ import annotations

import os
import re
import socket
import sys
import time
import uuid

import pytest

from ddp.dist.network import check_rendezvous_port, port_in_use, rendezvous_id
from ddp.errors import ConfigError
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


def test_a_rendezvous_port_held_by_another_job_is_refused(tmp_path, digits_root):
    """Another job's agent holds the head's port. torch's agent would become a client of
    its store and join (or, once that job ends, lose) a rendezvous not its own; ours
    exits 2 with one line naming the holder, before anything is written."""
    port = free_port()
    head = ["--head", f"127.0.0.1:{port}", "--nnodes", "2", "--nproc", "1"]
    other = launch(
        str(LAUNCH / "multinode.sh"), *head, "--run-id", "other",
        "--", *smoke_overrides(digits_root, tmp_path, "other"),
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not port_in_use(port):  # its agent serves the store (and waits for a 2nd node)
        assert other.poll() is None and time.monotonic() < deadline, other.finish().stdout
        time.sleep(0.1)
    mine = launch(
        str(LAUNCH / "multinode.sh"), *head, "--run-id", "mine",
        "--", *smoke_overrides(digits_root, tmp_path, "mine"),
    ).finish(timeout=60)  # fmt: skip
    assert mine.returncode == 2, mine.stdout
    (line,) = [line for line in mine.stdout.splitlines() if "error:" in line]
    assert (
        f"error: the rendezvous port {port} on {socket.gethostname()} is already in use by "
        f"pid {other.pid} (ddp.launch, rendezvous 'other'), not by an agent of rendezvous "
        "'mine'"
    ) in line, line
    assert not (tmp_path / "mine").exists()
    assert other.poll() is None  # the other job goes on


def test_the_rendezvous_port_check_names_any_holder():
    """Held by an agent of this rendezvous: go on. Held by anything else (here this test
    process, then an agent of another rendezvous): ConfigError naming it."""
    check_rendezvous_port(free_port(), "mine")
    with socket.socket() as held:
        held.bind(("", 0))
        port = held.getsockname()[1]
        held.listen()
        ours = rf"port {port} .* in use by pid {os.getpid()} \(\S+\), not by an agent"
        with pytest.raises(ConfigError, match=ours):
            check_rendezvous_port(port, "mine")
    agent = harness.start(
        [sys.executable, "-c", LISTENER, "--rdzv-endpoint=127.0.0.1:1", "--rdzv-id=mine"]
    )
    try:
        port = int(agent.popen.stdout.readline())
        check_rendezvous_port(port, "mine")
        with pytest.raises(ConfigError, match=r"in use by pid \d+ \(-c, rendezvous 'mine'\)"):
            check_rendezvous_port(port, "yours")
    finally:
        agent.kill()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["torchrun", "--rdzv-id=a", "--rdzv-endpoint=h:1"], "a"),
        (["python", "-m", "ddp.launch", "--rdzv_id", "b"], "b"),
        (["torchrun", "--rdzv-endpoint", "h:1", "x.py"], "none"),  # torchrun's default id
        (["nginx", "-g", "daemon off;"], None),
    ],
)
def test_the_rendezvous_id_of_a_command_line(argv, expected):
    assert rendezvous_id(argv) == expected


LISTENER = """import socket, time
s = socket.socket(); s.bind(("", 0)); s.listen(); print(s.getsockname()[1], flush=True)
time.sleep(60)"""


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
