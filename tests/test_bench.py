"""bench/overhead.py: its arithmetic, and a smoke run of the command in --quick mode.

No timing assertions: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests import harness
from tests.harness import ROOT

BENCH = ROOT / "bench" / "overhead.py"


def load_overhead():
    spec = importlib.util.spec_from_file_location("bench_overhead", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_steady_state_skips_the_first_epoch_and_shrugs_off_a_stall():
    o = load_overhead()
    run = o.Run("mlp", "raw", 0, 2, steps_per_epoch=10)
    run.epoch_end_times = [100.0, 101.0, 102.0, 109.0, 110.0]  # one 7 s stall
    run.train_seconds = [5.0, 0.5, 0.5, 0.5, 6.0]
    assert run.steps_per_s() == pytest.approx(10.0)
    assert run.train_steps_per_s() == pytest.approx(20.0)


def test_ratios_pair_runs_of_the_same_repeat():
    o = load_overhead()
    runs = [
        o.Run("mlp", "ours", 0, 2, wall_s=10.0),
        o.Run("mlp", "raw", 0, 2, wall_s=5.0),
        o.Run("mlp", "ours", 1, 2, wall_s=30.0),  # a slow phase hits both programs
        o.Run("mlp", "raw", 1, 2, wall_s=15.0),
    ]
    assert o.paired_ratio(runs, "ours", "raw", lambda r: r.wall_s, "mlp", 2) == 2.0


def test_goals_pass_and_fail_on_the_thresholds():
    o = load_overhead()
    summary = {
        "mlp": {
            "steady steps/s (whole epochs)": {"ours/raw": 0.97, "ours/lightning": 1.2},
            "whole-job wall s": {"ours/raw": 1.1},
            "peak RSS MiB (max rank)": {"ours/raw": 1.3},
        }
    }
    verdicts = {g["goal"]: g["pass"] for g in o.goals(summary, {"ours/raw": None})}
    assert verdicts == {
        "mlp: steps/s ours/raw >= 0.97": True,
        "mlp: steps/s ours/lightning >= 1.3": False,
        "mlp: whole-job wall ours/raw <= 1.1": True,
        "mlp: peak RSS ours/raw <= 1.2": False,
        "cnn: scaling 1->N ours/raw >= 0.97": None,
    }


@pytest.mark.slow
def test_quick_bench_runs_and_writes_json(tmp_path):
    out = tmp_path / "overhead.json"
    work = ["--work", str(tmp_path / "work"), "--json", str(out)]
    cmd = [sys.executable, str(BENCH), "--quick", "--programs", "ours,raw", *work]
    proc = harness.run(cmd, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== goals ==" in proc.stdout
    result = json.loads(out.read_text())
    programs = {r["program"] for r in result["runs"]}
    assert programs == {"ours", "raw", "ours-startup"}
    for run in result["runs"]:
        assert all(kb > 0 for kb in run["max_rss_kb"]) and len(run["max_rss_kb"]) == 2
        if run["program"] != "ours-startup":
            assert run["steps_per_s"] > 0 and run["train_steps_per_s"] > 0
    rows = result["summary"]["mlp"]
    assert rows["steady steps/s (whole epochs)"]["ours/raw"] > 0
    assert rows["launch -> first step s"]["ours"] > 0
    assert {g["goal"] for g in result["goals"]} >= {"mlp: steps/s ours/raw >= 0.97"}


@pytest.mark.slow
def test_index_bench_runs_at_a_simulated_hundred_million(tmp_path):
    """bench/index_bench.py end to end on a synthetic 100 M index (no v1 code needed)."""
    cmd = [sys.executable, str(ROOT / "bench" / "index_bench.py"), "--sizes", "100M"]
    proc = harness.run([*cmd, "--repeats", "1", "--data", str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| 100M")]
    assert [row[1] for row in rows] == [
        "v1",
        "v2 (synthetic)",
        "`ddp-shards order, one step`",
        "`ddp-plan`",
    ]
    assert "not run" in rows[0][3] and "load average" in proc.stdout
