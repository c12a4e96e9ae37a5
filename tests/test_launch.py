"""launch/local.sh and launch/multinode.sh for real: torchrun, gloo, the trainer."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sys
import time
import uuid

import psutil
import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from ddp import checkpoint
from ddp.distributed.network import check_rendezvous_port, port_in_use, rendezvous_id
from ddp.errors import ConfigError
from ddp.launch import failure_line, worker_exit_code
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


# ---------------------------------------------------------------- signals, lost ranks, codes


UNTIL_SIGNALLED = ("plateau=none", "trainer.max_epochs=100000", "trainer.log_every_steps=1")
"""A run a signal must end (no plateau stop, more epochs than any machine finishes first),
logging every step."""


def ddp_launch(overrides: list[str], *torchrun_args: str) -> harness.Running:
    """`python -m ddp.launch` with 2 processes, stderr apart: its last line is the launcher's."""
    cmd = [sys.executable, "-m", "ddp.launch", "--standalone", "--nproc-per-node=2"]
    return harness.start([*cmd, *torchrun_args, "-m", "ddp.train", *overrides], unset=("SLURM_",))


def wait_for_training(job: harness.Running, run_dir, timeout: float = 90) -> None:
    """Until the run logged a step: every worker's stop handler is in place by then."""
    job.wait_for_file(run_dir / "metrics.jsonl", timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if harness.records(run_dir, "train"):
                return
        except ValueError:  # a line being written
            pass
        if job.poll() is not None or time.monotonic() > deadline:
            job.kill()
            raise AssertionError(f"no training step:\n{job.finish().stderr[-3000:]}")
        time.sleep(0.05)


def stopped_with_a_checkpoint(run_dir, reason: str) -> int:
    """The run stopped for `reason` and its last.pt is where it stopped (past the start)."""
    (summary,) = harness.records(run_dir, "summary")  # one attempt: nothing restarted it
    assert summary["stop_reason"] == reason, summary
    position = checkpoint.load(run_dir / "checkpoints" / "last.pt")["position"]
    assert position["global_step"] == summary["global_step"] > 0, (position, summary)
    return position["global_step"]


def all_gone(family: list[psutil.Process], timeout: float = 30) -> list[psutil.Process]:
    """Those of `family` still running after `timeout` seconds."""
    return psutil.wait_procs(family, timeout=timeout)[1]


@pytest.mark.parametrize(
    ("sig", "code", "reason", "sent"),
    [
        (signal.SIGTERM, 75, "preempted", "SIGTERM passed on to the workers: "),
        (signal.SIGUSR1, 75, "preempted", "SIGUSR1 passed on to the workers: "),
        (signal.SIGINT, 130, "interrupted", "SIGINT passed on to the workers: "),
        (signal.SIGHUP, 75, "preempted", "SIGHUP passed on to the workers as SIGTERM: "),
    ],
    ids=lambda v: v.name if isinstance(v, signal.Signals) else None,
)
def test_a_signal_to_the_launcher_checkpoints_and_ends_with_the_workers_code(
    digits_root, tmp_path, sig, code, reason, sent
):
    """As Kubernetes, systemd or `timeout` signal the process they started. --max-restarts
    does not restart a stop (nor any of the trainer's codes)."""
    run_dir = tmp_path / "sig"
    job = ddp_launch(
        smoke_overrides(digits_root, tmp_path, "sig", *UNTIL_SIGNALLED), "--max-restarts=1"
    )
    wait_for_training(job, run_dir)
    family = job.descendants()
    assert len(family) >= 2, family  # the workers (and their DataLoader workers)
    job.send_signal(sig)
    job.popen.wait(timeout=120)  # the launcher alone: then nothing of the job may be left
    left = all_gone(family)
    out = job.finish()
    assert not left, left
    assert out.returncode == code, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"[ddp.launch] {sent}rank "), out.stderr[-3000:]
    assert f"exited with {code} ({reason})" in last
    assert "Traceback" not in out.stderr
    stopped_with_a_checkpoint(run_dir, reason)


def test_a_launcher_killed_outright_takes_its_workers_with_it(digits_root, tmp_path):
    """SIGKILL (the OOM killer, `kill -9`): the workers get SIGTERM from the kernel
    (PR_SET_PDEATHSIG) and stop as if preempted, with a checkpoint."""
    run_dir = tmp_path / "orphans"
    job = ddp_launch(smoke_overrides(digits_root, tmp_path, "orphans", *UNTIL_SIGNALLED))
    wait_for_training(job, run_dir)
    family = job.descendants()
    job.popen.kill()
    left = all_gone(family, timeout=60)
    job.finish()
    assert not left, left
    stopped_with_a_checkpoint(run_dir, "preempted")


def test_a_killed_rank_is_named_and_the_survivor_says_one_line(digits_root, tmp_path):
    run_dir = tmp_path / "killed"
    job = ddp_launch(smoke_overrides(digits_root, tmp_path, "killed", *UNTIL_SIGNALLED))
    wait_for_training(job, run_dir)
    job.worker(rank=1).kill()
    out = job.finish(timeout=120)
    assert out.returncode == 128 + signal.SIGKILL, out.stderr[-3000:]
    host = socket.gethostname()
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"[ddp.launch] rank 1 (host {host}) was killed by SIGKILL; rank 0 lost it (exit 4, "
        "peer lost) (torch's log: "
    ), out.stderr[-3000:]
    (lost,) = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert lost.startswith(f"error: lost rank 1 on host {host} (connection "), lost
    assert lost.endswith(f"rank 0 on host {host} stops (exit 4, peer lost)"), lost
    assert "Traceback" not in out.stderr and "Error executing job" not in out.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_train_sh_ends_with_the_trainers_code_and_make_train_with_makes(nan_root, tmp_path):
    """launch/train.sh, which `make train` runs, exits with the trainer's code (here 3, a
    non-finite loss); make itself exits 2 (GNU make, whatever failed) and names it."""
    up_to_date = harness.run(["make", "-q", ".venv/.ddp-installed"], timeout=30)
    if up_to_date.returncode != 0:
        pytest.skip("the .venv is not up to date with pyproject.toml: make train would install")
    overrides = [
        f"data.root={nan_root}",
        f"run.root={tmp_path}",
        "trainer.nonfinite=stop",
        "logger.curves=false",
    ]
    env = {"NPROC": "1"}
    script = harness.run([str(LAUNCH / "train.sh"), *overrides, "run.name=sh"], **env)
    assert script.returncode == 3, script.stderr[-3000:]
    last = script.stderr.strip().splitlines()[-1]
    assert re.match(r"\[ddp\.launch\] rank 0 \(host \S+\) exited with 3 \(nonfinite\)", last), last
    args = " ".join([*overrides, "run.name=make"])
    made = harness.run(["make", "--no-print-directory", "train", f"ARGS={args}"], **env)
    assert made.returncode == 2, made.stderr[-3000:]
    assert made.stderr.strip().splitlines()[-1].endswith("train] Error 3"), made.stderr[-3000:]


def failures(*ended: tuple[int, int, int]) -> dict[int, ProcessFailure]:
    """torch's records of ended workers: (rank, exit code, timestamp) each."""
    out = {}
    for rank, exitcode, timestamp in ended:
        out[rank] = ProcessFailure(rank, 1000 + rank, exitcode, error_file="<none>")
        out[rank].timestamp = timestamp
    return out


@pytest.mark.parametrize(
    ("ended", "code", "line"),
    [
        (  # a rank killed; the other lost it in the same second (a tie)
            [(0, 4, 10), (1, -9, 10)],
            137,
            "rank 1 (host h) was killed by SIGKILL; rank 0 lost it (exit 4, peer lost)",
        ),
        (  # the survivor gave up first: the other was stuck until torch's agent killed it
            [(0, 4, 10), (1, -9, 41)],
            137,
            "rank 1 (host h) stopped responding: rank 0 gave up on it (exit 4, peer lost), "
            "then it was killed by SIGKILL",
        ),
        (  # one of the trainer's codes wins over a signal before it
            [(0, -15, 10), (1, 75, 12)],
            75,
            "rank 1 (host h) exited with 75 (preempted)",
        ),
        (  # every rank here lost a peer: the one that went away is on another host
            [(2, 4, 10), (3, 4, 10)],
            4,
            "rank 2 (host h) exited with 4 (peer lost): the rank it lost ran on another host "
            "(see that host's output)",
        ),
        (  # a bug, and the ranks that lost it
            [(0, 1, 10), (1, 4, 11), (2, 4, 11)],
            1,
            "rank 0 (host h) exited with 1 (failed); ranks 1, 2 lost it (exit 4, peer lost)",
        ),
        ([(1, 2, 10), (0, 2, 10)], 2, "rank 0 (host h) exited with 2 (bad input)"),
    ],
)
def test_the_root_cause_is_the_rank_that_went_first(ended, code, line):
    assert failure_line(failures(*ended), "h") == (code, line)
    assert worker_exit_code(failures(*ended))[1] == code
