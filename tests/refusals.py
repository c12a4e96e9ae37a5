"""What the tests of refusals share: a finished run to refuse things on, a way to run
its command again, and the three checks of a refusal (exit 2, one `error:` line naming
the culprit and no traceback, every file of the run byte-identical: `snapshot`).

Registered by conftest.py (`pytest_plugins`): the fixtures `finished` and `run_copy`.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import harness
from tests.fixtures import smoke_overrides


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` (relative path -> sha256 of its bytes)."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def error_lines(out: subprocess.CompletedProcess) -> list[str]:
    return [line for line in out.stderr.splitlines() if line.startswith("error:")]


def assert_refused(out: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, one `error:` line naming `words`, and no traceback."""
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    lines = error_lines(out)
    assert len(set(lines)) == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def finished(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch smoke run (MLP, AdamW, W&B offline): what a refusal must not touch."""
    root = tmp_path_factory.mktemp("finished")
    out = harness.train(smoke_overrides(digits_root, root, "done"), nproc=0)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "done"


@pytest.fixture
def run_copy(finished: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run, in tmp_path/runs/done."""
    copy = tmp_path / "runs" / "done"
    shutil.copytree(finished, copy)
    return copy


def again(digits_root: Path, run_dir: Path, *extra: str, nproc: int = 0):
    """The finished run's command again (in `run_dir`), with `extra` overrides: plain
    python, or `python -m ddp.launch` (torchrun passing the workers' exit code on)."""
    overrides = smoke_overrides(digits_root, run_dir.parent, run_dir.name, *extra)
    if nproc == 0:
        return harness.train(overrides, nproc=0, timeout=120)
    launch = [sys.executable, "-m", "ddp.launch", "--standalone", f"--nproc-per-node={nproc}"]
    return harness.run([*launch, "-m", "ddp.train", *overrides], timeout=120)
