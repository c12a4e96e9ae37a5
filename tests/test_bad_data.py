"""Bad data in a 2-process job: one clear error on every rank and no hang, or skip and count."""

import pytest

from tests import harness
from tests.harness import records

pytestmark = pytest.mark.slow


def test_an_undecodable_sample_ends_every_process_with_its_name(garbled_root, smoke):
    out = harness.train([*smoke, f"data.root={garbled_root}"], timeout=120)
    assert out.returncode != 0
    assert "shard-000000.tar" in out.stderr and "digits-" in out.stderr  # shard and key


def test_on_error_skip_counts_the_sample_and_keeps_batches_equal(garbled_root, smoke, tmp_path):
    out = harness.train([*smoke, f"data.root={garbled_root}", "data.loader.on_error=skip"])
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "runs" / "test"
    assert [r["data/skipped_samples"] for r in records(run_dir, "val")] == [1, 1]
    summary = records(run_dir, "summary")[-1]
    assert summary["micro_batches_per_rank"] == [2 * 23, 2 * 23]  # 2 epochs, accumulate 1
