"""Talk to the local SLURM cluster (slurm/cluster.sh) the way a user does: sbatch,
scontrol, scancel (through tests/harness.py). No accounting daemon runs, so job states
come from `scontrol show job` (finished jobs stay visible for MinJobAge = 1 h)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests import harness
from tests.harness import ROOT

CLUSTER_SH = ROOT / "slurm" / "cluster.sh"
TRAIN_SBATCH = ROOT / "slurm" / "train.sbatch"
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def cluster_up() -> bool:
    """True when sinfo answers and shows at least one usable node."""
    if shutil.which("sinfo") is None:
        return False
    try:
        out = harness.run(["sinfo", "--noheader", "--format=%T"], timeout=20)
    except AssertionError:  # timed out
        return False
    states = out.stdout.split()
    return out.returncode == 0 and any(
        s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states
    )


def cluster_sh(action: str, timeout: float) -> subprocess.CompletedProcess:
    """`slurm/cluster.sh ACTION`. Not through the harness, which kills whatever a command
    leaves running: here, the daemons it starts."""
    cmd = ["bash", str(CLUSTER_SH), action]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def ensure_cluster() -> str | None:
    """None when the cluster is usable, else the reason to skip.

    DDP_TEST_SLURM=0 skips; DDP_TEST_SLURM=1 lets the tests start the cluster
    (as root: installs packages, writes /etc/slurm); unset uses a running one.
    """
    wish = os.environ.get("DDP_TEST_SLURM", "")
    if wish == "0":
        return "DDP_TEST_SLURM=0"
    if cluster_up():
        return None
    if wish not in ("1", "start"):
        return (
            "no SLURM cluster answers sinfo: run `slurm/cluster.sh start` (root)"
            " or set DDP_TEST_SLURM=1"
        )
    if os.geteuid() != 0:
        return "DDP_TEST_SLURM=1 but not root: slurm/cluster.sh start needs root"
    proc = cluster_sh("start", timeout=900)
    if proc.returncode != 0 or not cluster_up():
        raise RuntimeError(f"slurm/cluster.sh start failed:\n{proc.stdout}\n{proc.stderr}")
    return None


@dataclass
class Job:
    id: str
    log: Path
    slurm_conf: str | None = None
    """The cluster's slurm.conf when not the default one (the hosts' cluster)."""

    def scontrol_env(self) -> dict[str, str]:
        return {"SLURM_CONF": self.slurm_conf} if self.slurm_conf else {}

    def info(self) -> dict[str, str]:
        cmd = ["scontrol", "show", "job", "--oneliner", self.id]
        out = harness.run(cmd, timeout=30, **self.scontrol_env())
        if out.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout))

    @property
    def state(self) -> str:
        return self.info().get("JobState", "UNKNOWN")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def describe(self) -> str:
        info = self.info()
        keys = ("JobState", "Reason", "ExitCode", "Restarts")
        head = " ".join(f"{k}={info.get(k)}" for k in keys)
        return f"job {self.id}: {head}\n--- {self.log} ---\n{self.log_text()[-6000:]}"

    def wait(self, timeout: float = 300, states: set[str] = TERMINAL) -> str:
        """Block until the job reaches one of `states`; cancel it on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state
            if state in states:
                return state
            time.sleep(1)
        self.cancel()
        raise AssertionError(f"timed out after {timeout}s waiting for {states}\n{self.describe()}")

    def wait_for_log(self, pattern: str, timeout: float = 300) -> None:
        """Block until the job log matches `pattern` (a regex, multiline)."""
        rx = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if rx.search(self.log_text()):
                return
            if self.state in TERMINAL:
                break
            time.sleep(0.2)
        raise AssertionError(f"log never matched {pattern!r}\n{self.describe()}")

    def signal(self, sig: str, *scancel_args: str) -> None:
        cmd = ["scancel", f"--signal={sig}", *scancel_args, self.id]
        out = harness.run(cmd, timeout=30, **self.scontrol_env())
        assert out.returncode == 0, out.stderr

    def cancel(self) -> None:
        harness.run(["scancel", self.id], timeout=30, **self.scontrol_env())


def sbatch(script: Path, args: list[str], log_dir: Path, *sbatch_args: str, **env: str) -> Job:
    """Submit from the repository root (the job's SLURM_SUBMIT_DIR) with the log in log_dir;
    sbatch exports our environment (tests/harness.py's) to the job, plus `env`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = ["sbatch", "--parsable", f"--output={log_dir}/%x-%j.out", *sbatch_args, str(script)]
    out = harness.run([*cmd, *args], timeout=60, unset=("SLURM_", "SBATCH_"), **env)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split(";")[0]
    name = next((a.split("=", 1)[1] for a in sbatch_args if a.startswith("--job-name=")), "ddp")
    return Job(job_id, log_dir / f"{name}-{job_id}.out", env.get("SLURM_CONF"))
