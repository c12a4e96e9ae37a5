"""The benches: their goals (bench/goals.py), overhead.py's arithmetic, and smoke runs of
overhead.py --quick and index_bench.py that write their results files.

No timing assertions: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from bench import goals
from bench.goals import MISSED, Goal
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


def test_a_goal_is_met_at_its_bound_and_missed_beyond():
    assert Goal(1.5).met(1.5) and not Goal(1.5).met(1.49) and Goal(1.5).met(None) is None
    assert Goal(1.1, at_most=True).met(1.1) and not Goal(1.1, at_most=True).met(1.11)
    assert str(Goal(0.97)) == ">= 0.97" and str(Goal(200, at_most=True)) == "<= 200"
    assert goals.exit_code([{"pass": True}, {"pass": None}]) == 0
    assert goals.exit_code([{"pass": True}, {"pass": False}]) == MISSED != 0


def test_overhead_goals_pass_and_fail_on_the_thresholds():
    o = load_overhead()
    g = goals.OVERHEAD
    lightning = g["steps/s ours/lightning"]
    summary = {
        "mlp": {
            "steady steps/s (whole epochs)": {
                "ours/raw": g["steps/s ours/raw"].bound,  # at the bound: met
                "ours/lightning": lightning.bound - 0.01,
            },
            "whole-job wall s": {"ours/raw": g["whole-job wall ours/raw"].bound},
            "peak RSS MiB (max rank)": {"ours/raw": g["peak RSS ours/raw"].bound + 0.01},
        }
    }
    verdicts = {row["goal"]: row["pass"] for row in o.goals(summary, {"ours/raw": None})}
    assert verdicts == {
        f"mlp: steps/s ours/raw {g['steps/s ours/raw']}": True,
        f"mlp: steps/s ours/lightning {lightning}": False,
        f"mlp: whole-job wall ours/raw {g['whole-job wall ours/raw']}": True,
        f"mlp: peak RSS ours/raw {g['peak RSS ours/raw']}": False,
        f"cnn: scaling 1->N ours/raw {goals.SCALING}": None,
    }


def assert_results_file(path, bench: str, script: str) -> dict:
    """The results file holds the machine, the command line and the date."""
    result = json.loads(path.read_text())
    assert result["bench"] == bench and result["date"][:2] == "20"
    assert f"python {script} " in result["command"] and str(path) in result["command"]
    machine = result["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["torch"]
    assert isinstance(machine["gpus"], list)
    return result


@pytest.mark.slow
def test_quick_bench_runs_and_writes_json(tmp_path):
    out = tmp_path / "overhead.json"
    work = ["--work", str(tmp_path / "work"), "--json", str(out)]
    cmd = [sys.executable, str(BENCH), "--quick", "--programs", "ours,raw", *work]
    proc = harness.run(cmd, timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "== goals ==" in proc.stdout
    result = assert_results_file(out, "overhead-quick", "bench/overhead.py")
    missed = any(row["pass"] is False for row in result["goals"])  # a quick run's figures
    assert proc.returncode == (MISSED if missed else 0), proc.stdout[-3000:] + proc.stderr[-3000:]
    programs = {r["program"] for r in result["runs"]}
    assert programs == {"ours", "raw", "ours-startup"}
    for run in result["runs"]:
        assert all(kb > 0 for kb in run["max_rss_kb"]) and len(run["max_rss_kb"]) == 2
        if run["program"] != "ours-startup":
            assert run["steps_per_s"] > 0 and run["train_steps_per_s"] > 0
    rows = result["summary"]["mlp"]
    assert rows["steady steps/s (whole epochs)"]["ours/raw"] > 0
    assert rows["launch -> first step s"]["ours"] > 0
    assert {g["goal"] for g in result["goals"]} >= {
        f"mlp: {name} {goal}" for name, goal in goals.OVERHEAD.items() if "lightning" not in name
    }


@pytest.mark.slow
def test_index_bench_runs_at_a_simulated_hundred_million(tmp_path):
    """bench/index_bench.py end to end on a synthetic 100 M index (no v1 code needed)."""
    cmd = [sys.executable, str(ROOT / "bench" / "index_bench.py"), "--sizes", "100M"]
    out = tmp_path / "index.json"
    cmd += ["--repeats", "1", "--data", str(tmp_path), "--json", str(out)]
    proc = harness.run(cmd, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = assert_results_file(out, "index", "bench/index_bench.py")
    assert [row["pass"] for row in result["goals"]] == [None] * len(goals.INDEX)  # 1B, 2M only
    assert result["order"][0]["size"] == "100M" and result["order"][0]["v2"]["n"] == 100_000_000
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| 100M")]
    assert [row[1] for row in rows] == [
        "v1",
        "v2 (synthetic)",
        "`ddp-shards order, one step`",
        "`ddp-plan`",
    ]
    assert "not run" in rows[0][3] and "load average" in proc.stdout


@pytest.mark.slow
def test_perf_bench_runs_and_writes_json(tmp_path):
    """bench/perf_bench.py, as small as it goes: both cases, the epoch's figures and the
    FLOP count's start-up, judged and written."""
    out = tmp_path / "perf.json"
    cmd = [sys.executable, str(ROOT / "bench" / "perf_bench.py"), "--repeats", "1"]
    proc = harness.run([*cmd, "--blocks", "2", "--json", str(out)], timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    result = assert_results_file(out, "perf", "bench/perf_bench.py")
    missed = any(row["pass"] is False for row in result["goals"])  # two blocks: noisy
    assert proc.returncode == (MISSED if missed else 0), proc.stdout[-3000:]
    for case in ("mlp", "cnn"):
        assert result[case]["plain_steps_per_s"] > 0 and result[case]["watched/plain"] > 0
    assert result["epoch_figures_us"] > 0 and result["flop_count_s"]["first"] > 0
    assert [g["goal"] for g in result["goals"]] == [
        f"{case}: steps/s watched/plain {goals.PERF}" for case in ("mlp", "cnn")
    ]
