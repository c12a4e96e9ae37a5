"""Run the trainer as a user would: real processes, torchrun, gloo, nothing mocked."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ)
    out.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    out.update(extra)
    return out


def run(cmd: list[str], timeout: float = 240, **extra: str) -> subprocess.CompletedProcess:
    """Run `cmd` in its own session; on timeout kill the whole group so nothing is left behind."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env(**extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out}\n{err}") from None
    finally:
        kill_tree(proc.pid)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def descendants(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    children = [int(p) for p in found.split()]
    return children + [d for c in children for d in descendants(c)]


def kill_tree(pid: int) -> None:
    """SIGKILL a process, its group and every descendant: torchrun starts each worker in a
    session of its own, which a group kill alone would leave behind (holding our pipes)."""
    for target in [*descendants(pid), pid]:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def torchrun(nproc: int = 2, *extra_torchrun: str) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", *extra_torchrun]


def train(overrides: list[str], nproc: int = 2, timeout: float = 240, torchrun_args=(), **extra):
    cmd = [*torchrun(nproc, *torchrun_args), "-m", "ddp.train", *overrides]
    if nproc == 0:  # plain python, one process
        cmd = [sys.executable, "-m", "ddp.train", *overrides]
    return run(cmd, timeout=timeout, **extra)


def records(run_dir: Path, kind: str | None = None) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return [r for r in rows if kind is None or r.get("kind") == kind]


def copy_shards(src: Path, dst: Path, edit_first_npy) -> Path:
    """Copy a data root, rewriting the first training `.npy` member with `edit_first_npy(bytes)`,
    then index the copy with the real `ddp-shards index` (as a user's own tools would)."""
    edited = False
    for split in ("train", "val"):
        (dst / split).mkdir(parents=True)
        for shard in sorted((src / split).glob("*.tar")):
            with tarfile.open(shard) as tin, tarfile.open(dst / split / shard.name, "w") as tout:
                for member in tin.getmembers():
                    payload = tin.extractfile(member).read()
                    if split == "train" and member.name.endswith(".npy") and not edited:
                        payload, edited = edit_first_npy(payload), True
                    member.size = len(payload)
                    tout.addfile(member, io.BytesIO(payload))
        subprocess.run([str(BIN / "ddp-shards"), "index", str(dst / split)], check=True)
    return dst
