import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import ROOT


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """Digits shards made by the real prepare step, once per test session."""
    out = ROOT / "data" / "digits"
    if not (out / "train" / "manifest.json").exists():
        out = tmp_path_factory.mktemp("data") / "digits"
        subprocess.run(
            [sys.executable, "-m", "ddp.shards.cli", "prepare", "digits", "--out", str(out)],
            check=True,
            cwd=ROOT,
        )
    return out


@pytest.fixture
def base_overrides(digits_root, tmp_path) -> list[str]:
    """A fast digits run in a fresh run root."""
    return [
        f"data.root={digits_root}",
        f"run.root={tmp_path / 'runs'}",
        "run.name=test",
        "trainer.max_epochs=2",
        "trainer.progress=false",
        "model=mlp",
    ]
