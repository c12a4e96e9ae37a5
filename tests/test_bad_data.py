"""Bad data in a 2-process job: one clear error on every rank and no hang, or skip and count."""

import pytest

from tests import harness
from tests.harness import records

pytestmark = pytest.mark.slow


def garble(payload: bytes) -> bytes:
    return b"\x00garbage" * (len(payload) // 8) + b"\x00" * (len(payload) % 8)


@pytest.fixture
def garbled_root(digits_root, tmp_path):
    """Digits with one undecodable training sample (same size, so the manifest still matches)."""
    return harness.copy_shards(digits_root, tmp_path / "garbled", edit_first_npy=garble)


def test_an_undecodable_sample_ends_every_process_with_its_name(garbled_root, base_overrides):
    out = harness.train([*base_overrides, f"data.root={garbled_root}"], timeout=120)
    assert out.returncode != 0
    assert "shard-000000.tar" in out.stderr and "digits-" in out.stderr  # shard and key


def test_on_error_skip_counts_the_sample_and_keeps_batches_equal(
    garbled_root, base_overrides, tmp_path
):
    out = harness.train([*base_overrides, f"data.root={garbled_root}", "data.on_error=skip"])
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "runs" / "test"
    assert [r["data/skipped_samples"] for r in records(run_dir, "val")] == [1, 1]
    summary = records(run_dir, "summary")[-1]
    assert summary["micro_batches_per_rank"] == [2 * 23, 2 * 23]  # 2 epochs, accumulate 1
