"""Jobs across hosts for real: node1 and node2 of slurm/hosts.sh, each with its own network
(a veth on one bridge), hostname and /etc/hosts (its own name also on 127.0.1.1, as
Debian writes it), torchrun agents on each, and a SLURM cluster with one slurmd per host.

Needs root and Linux namespaces. DDP_TEST_HOSTS=1 builds the hosts (make test does, as
root) and removes them at the end; unset uses hosts that are up; 0 skips. The SLURM tests
start the hosts' cluster under DDP_TEST_SLURM=1 and skip under DDP_TEST_SLURM=0.
"""

from __future__ import annotations

import itertools
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from ddp.distributed.agreement import check_same_job
from ddp.distributed.env import Launch
from ddp.distributed.network import use_interface_towards_master
from ddp.errors import ConfigError
from tests import harness
from tests.distributed import run_distributed_test
from tests.fixtures import smoke_overrides
from tests.harness import ROOT, records
from tests.hosts_helpers import (
    ADDRESSES,
    CLUSTER_SH,
    HOSTS,
    HOSTS_SH,
    HOSTS_SLURM_CONF,
    ensure_hosts,
    ensure_hosts_cluster,
    on_host,
    processes_on,
    script,
)
from tests.slurm_helpers import TRAIN_SBATCH, Job, sbatch
from tests.test_faults import assert_bitwise_equal, final_weights

# One xdist worker runs the cluster tests (conftest.CLUSTER_MODULES).
pytestmark = [pytest.mark.hosts, pytest.mark.slow, pytest.mark.xdist_group("cluster")]

MULTINODE = ROOT / "launch" / "multinode.sh"
_PORTS = itertools.count(29400)


@pytest.fixture
def port() -> int:
    """The rendezvous port on node1 (each host has ports of its own): one per test, so
    no process a test left going away can hold the next test's port."""
    return next(_PORTS)


@pytest.fixture(scope="session")
def hosts():
    reason, built = ensure_hosts()
    if reason:
        pytest.skip(reason)
    yield
    if built:
        script(HOSTS_SH, "down")


DAEMONS = ("slurmctld", "slurmscriptd", "slurmd", "munged")
"""What may run on a host between tests: the daemons of the hosts' SLURM cluster."""


@pytest.fixture(autouse=True)
def nothing_left_on_the_hosts():
    """After a test, its agents, workers and job steps are gone from the hosts: what one
    test leaves there (a store on a rendezvous port) must not reach into the next."""
    before = harness.running()
    yield
    harness.kill_running(keep=before)  # what the test started (no_process_left_behind's job)
    deadline = time.monotonic() + 30
    while left := {
        pid: cmd
        for host in HOSTS
        for pid, cmd in processes_on(host).items()
        if cmd.lstrip(": ").split(" ")[0].rsplit("/", 1)[-1] not in DAEMONS
    }:
        assert time.monotonic() < deadline, f"left running on the hosts: {left}"
        time.sleep(0.2)


@pytest.fixture(scope="session")
def hosts_cluster(hosts):
    reason, started = ensure_hosts_cluster()
    if reason:
        pytest.skip(reason)
    yield
    if started:  # its daemons, and the hosts with them
        script(CLUSTER_SH, "--hosts", str(len(HOSTS)), "stop")


@pytest.fixture
def jobs(hosts_cluster):
    """Submitted jobs, cancelled at the end of the test whatever happened."""
    submitted: list[Job] = []
    yield submitted
    for job in submitted:
        job.cancel()


EPOCHS = 16
"""An epoch takes 0.3 s across the namespace hosts: at 6 epochs a resumed job could end
in the 2 s it took a test to see the line it waits for and kill a host (a node failure
that came after the run had finished: CI, 2026-12-06); 16 leave it several seconds."""


def job_args(digits_root: Path, run_root: Path, name: str | None, *extra: str) -> list[str]:
    """EPOCHS epochs of 23 steps, a checkpoint every 5 steps, the sample audit on."""
    return smoke_overrides(
        digits_root,
        run_root,
        name,
        "plateau=none",
        "logger=none",
        f"trainer.max_epochs={EPOCHS}",
        "trainer.checkpoint.every_steps=5",
        "trainer.audit_samples=true",
        "trainer.log_every_steps=1",
        *extra,
    )


@pytest.fixture(scope="module")
def reference(digits_root, tmp_path_factory) -> Path:
    """The job on one host (this machine), 2 processes: what two hosts must reproduce."""
    run_root = tmp_path_factory.mktemp("one-host")
    out = harness.train(job_args(digits_root, run_root, "reference"))
    assert out.returncode == 0, out.stderr[-3000:]
    return run_root / "reference"


def agent(host: str, port: int, *args: str, **env: str) -> harness.Running:
    """launch/multinode.sh on `host`: one torchrun agent with one worker, rendezvous on
    node1's name."""
    cmd = [str(MULTINODE), "--head", f"node1:{port}", "--nproc", "1", *args]
    return harness.start(
        on_host(host, cmd), merge_stderr=True, unset=("SLURM_",), DDP_PYTHON=sys.executable, **env
    )


ANSWER_ONE_CONNECTION = """
import socket, sys
with socket.create_server(("", int(sys.argv[1]))) as server:
    connection, _ = server.accept()
    with connection:
        connection.recv(1)  # until the caller closes: the TIME_WAIT is its, not this port's
"""


def wait_for_a_connection(host: str, port: int, caller: harness.Running) -> None:
    """Until something connects to `host`:`port` (ddp.launch on another host polls its
    rendezvous port until it answers); fail with `caller`'s output if it ends first.
    Nothing listens there afterwards."""
    answer = [sys.executable, "-c", ANSWER_ONE_CONNECTION, str(port)]
    listener = harness.start(on_host(host, answer))
    caller.wait_until(lambda: listener.poll() is not None, f"nothing reached {host}:{port}", 120)
    out = listener.finish(timeout=10)
    assert out.returncode == 0, out.stderr[-3000:]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error:" in line]


# ---- torchrun across hosts


def test_two_hosts_train_as_one_host_does(hosts, port, reference, digits_root, tmp_path):
    """c10d rendezvous on node1's name; each host's process group on its own eth0 (not on
    the 127.0.1.1 its name also resolves to); the weights of one host with 2 processes."""
    args = job_args(digits_root, tmp_path, "two-hosts")
    agents = [agent(host, port, "--nnodes", "2", "--run-id", "two", "--", *args) for host in HOSTS]
    outs = [a.finish() for a in agents]
    for host, out in zip(HOSTS, outs, strict=True):
        assert out.returncode == 0, f"{host}:\n{out.stdout[-3000:]}"
        chosen = rf"^network: eth0 \({ADDRESSES[host]}\) towards MASTER_ADDR node[12] "
        assert re.search(chosen, out.stdout, re.MULTILINE), out.stdout[-3000:]
    both = "\n".join(out.stdout for out in outs)
    assert re.search(r"^world size\s+2$", both, re.MULTILINE), both
    assert_bitwise_equal(final_weights(tmp_path / "two-hosts"), final_weights(reference))


def test_losing_a_host_continues_on_the_survivor(hosts, port, digits_root, tmp_path):
    """--nnodes=1:2: node2's agent and worker are killed mid-run; node1 re-forms the job
    alone (world size 1, accumulation 2, the same global batch) from the last checkpoint,
    and every epoch still uses every sample once."""
    run_dir = tmp_path / "elastic"
    elastic = ["--nnodes", "1:2", "--max-restarts", "3", "--run-id", "elastic"]
    # last_call_timeout: how long the survivor waits for others before going on alone.
    rdzv = {"TORCHRUN_ARGS": "--rdzv-conf=join_timeout=120,last_call_timeout=10"}
    args = job_args(digits_root, tmp_path, "elastic")
    # node2 first, and node1 once node2's launcher is knocking on node1's port: node2's
    # agent is up and waits for node1's store, so both hosts are in the first rendezvous
    # even where starting an agent takes longer than last_call_timeout (on a loaded
    # machine node1 once formed the job alone, and node2's late join restarted it).
    node2 = agent("node2", port, *elastic, "--", *args, **rdzv)
    wait_for_a_connection("node1", port, node2)
    node1 = agent("node1", port, *elastic, "--", *args, **rdzv)
    node1.wait_for_file(run_dir / "checkpoints" / "last.pt", timeout=180)
    harness.kill_tree(node2.pid)  # the host's agent and its worker, SIGKILL
    lost = node2.finish(timeout=30)
    out = node1.finish()

    assert out.returncode == 0, out.stdout[-3000:]
    both = lost.stdout + out.stdout
    # The plan of each attempt (rank 0 prints it): 2 hosts, then the survivor alone. (Had
    # node2 come more than last_call_timeout late, node1 would have started alone first.)
    sizes = re.findall(r"^world size\s+(\d+)$", both, re.MULTILINE)
    accumulation = re.findall(r"^accumulation\s+(\d+)$", both, re.MULTILINE)
    assert sizes[-2:] == ["2", "1"] and accumulation[-2:] == ["1", "2"], both
    assert set(re.findall(r"^global batch \(G\)\s+(\d+)$", both, re.MULTILINE)) == {"64"}
    assert re.search(r"continuing at epoch \d+ step \d+", out.stdout), out.stdout
    # Every step once in the metrics, every sample once per epoch (plus the padding),
    # the resumed epoch included: its counts so far travel in the checkpoint.
    assert [r["step"] for r in records(run_dir, "train")] == list(range(1, EPOCHS * 23 + 1))
    (plan,) = records(run_dir, "plan")
    audits = [
        (r["audit/unique_samples"], r["audit/missing_samples"], r["audit/repeated_samples"])
        for r in records(run_dir, "val")
    ]
    assert audits == [(plan["num_samples"], 0, plan["padded_samples"])] * EPOCHS


# ---- start-up checks across hosts: one line naming the host, exit 2, no hang


def test_a_rendezvous_host_that_does_not_resolve(hosts, port, digits_root, tmp_path):
    # Inside a host, whose only route is the bridge: the failed lookup sends nothing out.
    cmd = [str(MULTINODE), "--head", f"nosuchhost:{port}", "--nnodes", "2", "--run-id", "x"]
    args = ["--", *job_args(digits_root, tmp_path, "unresolved")]
    out = harness.run(on_host("node2", [*cmd, *args]), merge_stderr=True, DDP_PYTHON=sys.executable)
    assert out.returncode == 2, out.stdout
    (line,) = error_lines(out.stdout)
    assert "rendezvous host nosuchhost does not resolve on node2" in line, line
    assert not (tmp_path / "unresolved").exists()


def test_a_blocked_rendezvous_port(hosts, port, digits_root, tmp_path):
    """A firewall on node1 drops the rendezvous port: node2 cannot reach it, node1 waits in
    vain; both stop after the rendezvous' join_timeout."""
    blocked = script(HOSTS_SH, "block", "node1", str(port))
    assert blocked.returncode == 0, blocked.stdout + blocked.stderr
    try:
        rdzv = {"TORCHRUN_ARGS": "--rdzv-conf=join_timeout=5"}
        args = job_args(digits_root, tmp_path, "blocked")
        job = ["--nnodes", "2", "--run-id", "b", "--", *args]
        runs = [agent(host, port, *job, **rdzv) for host in HOSTS]
        node1, node2 = (r.finish(timeout=120) for r in runs)
    finally:
        script(HOSTS_SH, "unblock", "node1")
    assert node2.returncode == 2, node2.stdout
    (line,) = error_lines(node2.stdout)
    assert f"cannot reach the rendezvous node1:{port} from node2 within 5 s" in line, line
    assert node1.returncode == 2, node1.stdout
    (line,) = error_lines(node1.stdout)
    assert f"not every host joined the rendezvous node1:{port} within 5 s" in line, line
    assert "(seen from node1)" in line, line


def test_hosts_that_run_different_code(hosts, port, digits_root, tmp_path):
    """node2 runs a checkout in which one file differs: both exit 2, one line naming it."""
    checkout = tmp_path / "checkout"
    for part in ("ddp", "conf", "launch"):
        shutil.copytree(ROOT / part, checkout / part, ignore=shutil.ignore_patterns("__pycache__"))
    with (checkout / "ddp" / "train.py").open("a") as f:
        f.write("# edited on node2 only\n")
    args = ["--nnodes", "2", "--run-id", "code", "--", *job_args(digits_root, tmp_path, "code")]
    node1 = agent("node1", port, *args)
    cmd = [str(checkout / "launch" / "multinode.sh"), "--head", f"node1:{port}", "--nproc", "1"]
    # From the checkout, as a user there would: `-m ddp.train` imports from the cwd first.
    node2 = harness.start(
        on_host("node2", [*cmd, *args]), cwd=checkout, merge_stderr=True, DDP_PYTHON=sys.executable
    )
    outs = [node1.finish(), node2.finish()]
    assert [out.returncode for out in outs] == [2, 2], outs[0].stdout + outs[1].stdout
    (line,) = error_lines(outs[0].stdout + outs[1].stdout)
    names = r"host node[12] \(rank 1\) runs another ddp code than host node[12] \(rank 0\)"
    assert re.search(rf"{names}: ddp/train.py differs", line), line
    assert not (tmp_path / "code").exists()  # refused before anything was written


def refuse_other_config(env, run_dir: str) -> tuple[str, bool] | None:
    """check_same_job on a rank whose config differs from rank 0's (rank 1: optim.lr)."""
    record = {"seed": 0, "optim": {"name": "sgd", "lr": 0.1 if env.rank == 0 else 0.2}}
    try:
        check_same_job(env, record, Path(run_dir))
    except ConfigError as exc:
        return str(exc), exc.shown
    return None


def test_ranks_with_different_configs_refuse_together(tmp_path):
    """The start-up exchange on 2 real gloo ranks: both refuse, rank 0 alone prints the line,
    which names the key."""
    outcomes = run_distributed_test(refuse_other_config, world_size=2, func_args=(str(tmp_path),))
    (message, shown_by_rank0), (same_message, shown_by_rank1) = outcomes
    assert message == same_message and (shown_by_rank0, shown_by_rank1) == (True, False)
    assert "(rank 1) runs another resolved config than host" in message, message
    assert "optim.lr is 0.2 there, 0.1 on rank 0" in message, message


# ---- the interface of the process group


def test_the_interface_follows_the_route_to_master():
    """Across hosts, GLOO/NCCL_SOCKET_IFNAME take the interface of the route to MASTER_ADDR
    (here loopback); the user's own choice stands; a one-host job is left alone."""
    across = Launch("torchrun", rank=1, local_rank=0, world_size=2, local_world_size=1)
    environ = {"MASTER_ADDR": "127.0.0.1"}
    route = use_interface_towards_master(across, environ)
    assert route is not None and route.interface == "lo" and route.source == "127.0.0.1"
    assert environ["GLOO_SOCKET_IFNAME"] == environ["NCCL_SOCKET_IFNAME"] == "lo"

    environ = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "ib0"}
    use_interface_towards_master(across, environ)
    assert environ["GLOO_SOCKET_IFNAME"] == "ib0" and environ["NCCL_SOCKET_IFNAME"] == "lo"

    one_host = Launch("torchrun", rank=1, local_rank=1, world_size=2, local_world_size=2)
    environ = {"MASTER_ADDR": "127.0.0.1"}
    assert use_interface_towards_master(one_host, environ) is None
    assert environ == {"MASTER_ADDR": "127.0.0.1"}


def test_a_host_whose_name_is_also_loopback_binds_its_network_address(hosts):
    """node1's name resolves to 127.0.1.1 and 10.77.0.11 on node1: the route skips loopback."""
    probe = (
        "from ddp.distributed.network import route_to; r = route_to('node1'); "
        "print(r.interface, r.source)"
    )
    out = harness.run(on_host("node1", [sys.executable, "-c", probe]), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["eth0", ADDRESSES["node1"]], out.stdout


# ---- SLURM across hosts


def submit(jobs: list[Job], tmp_path: Path, args: list[str]) -> Job:
    """sbatch -N 2 slurm/train.sbatch on the hosts' cluster: one agent and worker per node."""
    job = sbatch(
        TRAIN_SBATCH,
        args,
        tmp_path / "logs",
        "--nodes=2",
        DDP_PYTHON=sys.executable,
        NPROC_PER_NODE="1",
        SLURM_CONF=HOSTS_SLURM_CONF,
    )
    jobs.append(job)
    return job


def test_a_two_node_job_survives_preemption_and_a_node_failure(
    jobs, reference, digits_root, tmp_path
):
    """sbatch -N 2: USR1 to the batch shell (checkpoint, exit 75, requeue, resume), then
    node2 dies (every process on it: slurmd, the job's step, its worker) and slurmctld
    requeues the job; once node2 is back it resumes again on both nodes. The final weights
    are those of the uninterrupted one-host job."""
    job = submit(jobs, tmp_path, job_args(digits_root, tmp_path / "runs", None))
    job.wait_for_log(r"^run directory: .*\(new run\)", timeout=300)
    job.signal("USR1", "--batch")
    job.wait_for_log(r"requeueing job", timeout=120)
    job.wait_for_log(r"^run directory: .*\(continuing at", timeout=300)
    killed = script(HOSTS_SH, "kill", "node2")
    assert killed.returncode == 0, killed.stderr
    deadline = time.monotonic() + 120
    while job.info().get("Restarts") != "2":  # slurmctld found node2 dead and requeued
        assert time.monotonic() < deadline, job.describe()
        time.sleep(1)
    back = script(CLUSTER_SH, "--hosts", str(len(HOSTS)), "start")  # node2's slurmd again
    assert back.returncode == 0, back.stdout + back.stderr

    assert job.wait(timeout=300) == "COMPLETED", job.describe()
    info, log = job.info(), job.log_text()
    assert info["ExitCode"] == "0:0", job.describe()
    assert "[launch node1]" in log and "[launch node2]" in log, log
    assert re.search(r"exited with 75 \(preempted\)", log), log  # the preemption's checkpoint
    assert re.search(r"node failure", log, re.IGNORECASE), log
    assert len(re.findall(r"continuing at epoch \d+ step \d+", log)) == 2, log
    run_dir = tmp_path / "runs" / f"slurm-{job.id}"
    assert_bitwise_equal(final_weights(run_dir), final_weights(reference))
