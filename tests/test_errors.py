"""Bad input is one kind of exception: every refusal is a `BadInput`, and every tool turns
one into exit 2 and one line.

The kinds met through the tools elsewhere: ddp-train refuses each of the four with exit 2
and one line (test_nothing_lost.py: ConfigError, CheckpointError, DataError; test_train.py:
ConfigError; PlanError, ConfigError and DataError through ddp-plan in test_train.py and
test_own_data.py; ddp-shards in test_shards.py; ddp.launch in test_launch.py). Here: the
kinds themselves, and the refusals of the tools no other test refuses with.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ddp import export, plan_cli
from ddp.data.stream_shards import Interrupted
from ddp.errors import BadInput, CheckpointError, ConfigError, DataError, PlanError
from ddp.state import Refusal
from tests import harness


@pytest.mark.parametrize("kind", [ConfigError, PlanError, DataError, CheckpointError])
def test_each_kind_of_bad_input_is_a_bad_input(kind):
    assert issubclass(kind, BadInput)
    with pytest.raises(BadInput, match="the culprit"):
        raise kind("the culprit")


def test_the_kinds_keep_their_builtin_bases_and_subclasses_stay_bad_input():
    assert issubclass(ConfigError, ValueError) and issubclass(PlanError, ValueError)
    assert issubclass(CheckpointError, RuntimeError)
    assert issubclass(Refusal, ConfigError) and issubclass(Interrupted, DataError)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_ddp_plan_refuses_missing_data_with_exit_2_and_one_line(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exit_code:
        plan_cli.main([f"data.root={tmp_path}"])  # no num_samples: it reads the manifest
    assert exit_code.value.code == 2
    assert f"{tmp_path}/train: no such directory" in one_error_line(capsys.readouterr().err)


def test_ddp_export_refuses_a_path_without_checkpoints(tmp_path: Path, capsys):
    assert export.main([str(tmp_path), "--out", str(tmp_path / "model.pt2")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{tmp_path}: neither a checkpoint nor a run directory" in line
    assert not (tmp_path / "model.pt2").exists()


@pytest.mark.slow
def test_ddp_eval_refuses_a_path_without_checkpoints(tmp_path: Path):
    out = harness.run([sys.executable, "-m", "ddp.eval_cli", str(tmp_path)], timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"{tmp_path}: neither a checkpoint" in one_error_line(out.stderr)
    assert not list(tmp_path.iterdir())  # nothing written
