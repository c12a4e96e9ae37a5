"""The README's shell blocks that claim to work do work: each block marked
`<!-- tested -->` runs, as written, with bash in a copy of the repository (the
environment's .venv and the digits shards linked in, nothing written to this checkout)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import harness

pytestmark = pytest.mark.slow

README = harness.ROOT / "README.md"
MARKED = re.compile(r"<!-- tested -->\n```bash\n(.*?)```", re.DOTALL)


def tested_blocks() -> list[str]:
    return MARKED.findall(README.read_text())


def checkout_copy(dst: Path) -> Path:
    """The files git knows (committed or not yet), as a fresh clone would have them."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=harness.ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in listed:
        src = harness.ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            (dst / name).write_bytes(src.read_bytes())
    (dst / ".venv").symlink_to(Path(sys.executable).parent.parent)
    (dst / "data" / "digits").symlink_to(harness.ROOT / "data" / "digits")
    return dst


def test_the_readme_marks_blocks_to_run():
    assert len(tested_blocks()) >= 1


@pytest.mark.parametrize("number", range(len(tested_blocks())))
def test_a_tested_readme_block_runs_as_written(tmp_path, number):
    if not (harness.ROOT / "data" / "digits" / "train").exists():
        pytest.skip("data/digits is made by `make test` (ddp-shards prepare digits)")
    repo = checkout_copy(tmp_path / "repo")
    block = tested_blocks()[number]
    script = tmp_path / "block.sh"
    script.write_text("set -euo pipefail\n" + block)
    out = harness.run(["bash", str(script)], cwd=repo, timeout=600, unset=("PYTHONPATH",))
    assert out.returncode == 0, f"{block}\n--- stdout\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
