"""Talk to the local SLURM cluster (slurm/cluster.sh) the way a user does: sbatch,
scontrol, scancel. No accounting daemon runs, so job states come from
`scontrol show job` (finished jobs stay visible for MinJobAge = 1 h)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

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
        out = subprocess.run(
            ["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        return False
    states = out.stdout.split()
    return out.returncode == 0 and any(
        s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states
    )


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
    proc = subprocess.run(
        ["bash", str(CLUSTER_SH), "start"], capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0 or not cluster_up():
        raise RuntimeError(f"slurm/cluster.sh start failed:\n{proc.stdout}\n{proc.stderr}")
    return None


@dataclass
class Job:
    id: str
    log: Path

    def info(self) -> dict[str, str]:
        out = subprocess.run(
            ["scontrol", "show", "job", "--oneliner", self.id], capture_output=True, text=True
        )
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
        subprocess.run(["scancel", f"--signal={sig}", *scancel_args, self.id], check=True)

    def cancel(self) -> None:
        subprocess.run(["scancel", self.id], capture_output=True)


def job_env(**extra: str) -> dict[str, str]:
    """The environment sbatch passes on to the job (it exports ours)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def sbatch(script: Path, args: list[str], log_dir: Path, *sbatch_args: str, **env: str) -> Job:
    """Submit from the repository root (the job's SLURM_SUBMIT_DIR) with the log in log_dir."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        ["sbatch", "--parsable", f"--output={log_dir}/%x-%j.out", *sbatch_args, str(script), *args],
        cwd=ROOT,
        env=job_env(**env),
        capture_output=True,
        text=True,
        check=True,
    )
    job_id = out.stdout.strip().split(";")[0]
    name = next((a.split("=", 1)[1] for a in sbatch_args if a.startswith("--job-name=")), "ddp")
    return Job(job_id, log_dir / f"{name}-{job_id}.out")
