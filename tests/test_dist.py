"""ddp.distributed: launcher detection, shared decisions, clean exits and torchrun restarts.

The named collectives run on 2 gloo ranks started in-process (tests/distributed.py).
What is about torchrun itself (exit codes, restarts, the agent's store) runs real
2-process torchrun jobs of tests/workers/trial.py, as a user would; `--standalone`
picks a free rendezvous port and every process of a job is killed when the test is
done with it.
"""

from __future__ import annotations

import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import torch

from ddp.distributed import collectives
from ddp.distributed.env import Launch, detect
from ddp.distributed.group import init_distributed, shutdown
from ddp.distributed.lost_peer import LostPeer, lost_peer, lost_peer_line
from tests import harness
from tests.distributed import run_distributed_test
from tests.workers import trial

WORKER = harness.ROOT / "tests" / "workers" / "trial.py"
LAUNCHER_VARS = (
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NTASKS",
    "SLURM_NTASKS_PER_NODE",
)


@dataclass
class Job:
    returncode: int
    stdout: str
    stderr: str

    def ranks_done(self) -> dict[int, dict]:
        """What each rank reported on its `rank R: done {json}` line."""
        found = re.findall(r"rank (\d+): done (\{.*?\})(?=rank \d+:|\n|$)", self.stdout)
        return {int(rank): json.loads(seen) for rank, seen in found}


def run_torchrun(*worker_args: str, max_restarts: int = 0, timeout_s: float = 90) -> Job:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["--monitor-interval=0.1", f"--max-restarts={max_restarts}", str(WORKER), *worker_args]
    out = harness.run(cmd, timeout=timeout_s, unset=LAUNCHER_VARS)
    return Job(out.returncode, out.stdout, out.stderr)


def clear_launcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)


def test_detect_local(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_launcher_env(monkeypatch)
    assert detect() == Launch("python", rank=0, local_rank=0, world_size=1, local_world_size=1)


def test_detect_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_launcher_env(monkeypatch)
    env = {"TORCHELASTIC_RUN_ID": "x", "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}
    for key, value in (env | {"LOCAL_WORLD_SIZE": "4", "SLURM_PROCID": "0"}).items():
        monkeypatch.setenv(key, value)
    want = Launch("torchrun", rank=5, local_rank=1, world_size=8, local_world_size=4)
    assert detect() == want  # torchrun inside an sbatch allocation wins over SLURM


def test_detect_srun(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_launcher_env(monkeypatch)
    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4"}
    for key, value in (env | {"SLURM_NTASKS_PER_NODE": "2(x2)"}).items():
        monkeypatch.setenv(key, value)
    want = Launch("slurm", rank=3, local_rank=1, world_size=4, local_world_size=2)
    assert detect() == want


def test_single_process_needs_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_launcher_env(monkeypatch)
    env = init_distributed(detect(), torch.device("cpu"))
    assert not env.distributed and env.is_main
    assert collectives.all_agree(False, env) is False
    assert collectives.any_rank(True, env) is True
    shutdown(env)


@pytest.fixture(scope="module")
def clean_jobs() -> list[Job]:
    """Four finished 2-process jobs, two at a time (gloo's exit abort was ~1 in 6: four
    catch it 1 - (5/6)^4 = 52% of the time; bench/exit_trials.py runs 50)."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda _: run_torchrun("--steps", "3"), range(4)))


@pytest.mark.slow
def test_clean_job_exits_zero_every_time(clean_jobs: list[Job]) -> None:
    for job in clean_jobs:
        assert job.returncode == 0, job.stderr[-3000:]
        assert sorted(job.ranks_done()) == [0, 1], job.stdout


def test_ranks_agree_when_only_one_rank_has_the_flag() -> None:
    seen = run_distributed_test(trial.collectives, world_size=2)
    assert [seen[r]["detect"]["rank"] for r in (0, 1)] == [0, 1]
    assert all(seen[r]["detect"]["world_size"] == 2 for r in (0, 1))
    assert [seen[r]["all_agree"] for r in (0, 1)] == [False, False]
    assert [seen[r]["any_rank"] for r in (0, 1)] == [True, True]
    assert [seen[r]["world_from_sum"] for r in (0, 1)] == [2, 2]
    assert [seen[r]["from_rank0"] for r in (0, 1)] == ["hello from 0"] * 2
    assert [seen[r]["gathered"] for r in (0, 1)] == [["000000", "010101"]] * 2
    assert [seen[r]["gathered_sizes"] for r in (0, 1)] == [[5, 60]] * 2


@pytest.mark.slow
def test_crash_under_torchrun_restarts_and_completes() -> None:
    job = run_torchrun("--steps", "4", "--crash-rank", "1", "--crash-step", "2", max_restarts=1)
    assert "simulated crash" in job.stderr
    assert job.returncode == 0, job.stderr[-3000:]
    seen = job.ranks_done()
    assert sorted(seen) == [0, 1], job.stdout
    assert all(seen[r]["attempt"] == 1 for r in (0, 1))


# ---------------------------------------------------------------- a lost peer


RESET = (  # rank 1 SIGKILLed during the DDP all-reduce (the comm hook wraps gloo's error)
    "Got the following error when running the callback: RuntimeError: [/__w/pytorch/pytorch/"
    "third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:37578: "
    "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in "
    "the application. Check the logs of the remote worker before reporting an error. GLHF! 🏖️"
)
CLOSED = (  # rank 1 SIGKILLed before an all_reduce, barrier or broadcast_object_list
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed "
    "by peer [127.0.0.1]:32431. This is typically caused by a remote worker crashing. Check "
    "the logs of the remote worker before reporting an error. GLHF! 🏖️"
)
RECV_TIMEOUT = (  # rank 1 SIGSTOPped, process group timeout 5 s
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
    "waiting 5000ms for recv operation to complete"
)
SEND_TIMEOUT = (  # the same in all_gather_object
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:129] Timed "
    "out waiting 3000ms for send operation to complete"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            RESET,
            LostPeer(stuck=False, address="127.0.0.1:37578", reason="connection reset by peer"),
        ),
        (
            CLOSED,
            LostPeer(stuck=False, address="127.0.0.1:32431", reason="connection closed by peer"),
        ),
        (
            "[/x/pair.cc:589] Write error [10.0.0.2]:4242: Broken pipe. GLHF",
            LostPeer(stuck=False, address="10.0.0.2:4242", reason="broken pipe"),
        ),
        (
            RECV_TIMEOUT,
            LostPeer(
                stuck=True, address=None, reason="timed out waiting 5000ms for recv operation"
            ),
        ),
        (
            SEND_TIMEOUT,
            LostPeer(
                stuck=True, address=None, reason="timed out waiting 3000ms for send operation"
            ),
        ),
        ("DataLoader worker (pid 4242) is killed by signal: Killed.", None),
        ("mat1 and mat2 shapes cannot be multiplied (16x64 and 32x10)", None),
        ("DataLoader timed out after 5 seconds", None),
    ],
)
def test_a_lost_peer_is_told_from_other_errors(text, expected):
    assert lost_peer(RuntimeError(text)) == expected


def test_a_lost_peer_is_found_in_what_an_error_was_raised_from():
    try:
        try:
            raise RuntimeError(CLOSED)
        except RuntimeError as gloo:
            raise ValueError("the step's sums could not be read") from gloo
    except ValueError as exc:
        assert lost_peer(exc).reason == "connection closed by peer"


@pytest.mark.parametrize(
    ("text", "launch", "line"),
    [
        (
            RESET,
            Launch("torchrun", rank=0, local_rank=0, world_size=2, local_world_size=2),
            "error: lost rank 1 on host h (connection reset by peer [127.0.0.1:37578]: it crashed "
            "or was killed, see its output); rank 0 on host h stops (exit 4, peer lost)",
        ),
        (
            RECV_TIMEOUT,
            Launch("torchrun", rank=1, local_rank=1, world_size=2, local_world_size=2),
            "error: lost rank 0 on host h (no answer within trainer.timeout_s=5: it is stuck or "
            "gone); rank 1 on host h stops (exit 4, peer lost)",
        ),
        (  # 4 ranks on 2 hosts: which rank is not known here, its address is
            CLOSED.replace("127.0.0.1", "10.0.0.2"),
            Launch("torchrun", rank=3, local_rank=1, world_size=4, local_world_size=2),
            "error: lost a peer at 10.0.0.2:32431 (connection closed by peer: it crashed or was "
            "killed, see its output); rank 3 on host h stops (exit 4, peer lost)",
        ),
    ],
)
def test_the_survivor_names_the_peer_it_lost_as_far_as_it_knows(text, launch, line):
    assert lost_peer_line(lost_peer(RuntimeError(text)), launch, "h", timeout_s=5) == line
