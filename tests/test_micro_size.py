"""batch.micro_size=auto (ddp.micro_size): the search, the ranks' agreement and the
refusal where there is no GPU. The trial steps themselves need CUDA:
tests/test_cuda.py::test_micro_size_auto_finds_what_fits_and_trains."""

from __future__ import annotations

import sys

import pytest

from ddp.errors import ConfigError
from ddp.micro_size import candidates, largest_that_fits
from tests import harness
from tests.fixtures import smoke_overrides


def test_the_candidates_keep_the_global_batch_a_multiple_of_micro_times_world():
    assert candidates(64, 2) == [32, 16, 8, 4, 2, 1]
    assert candidates(96, 4) == [24, 12, 8, 6, 4, 3, 2, 1]
    with pytest.raises(ConfigError, match="not a multiple of world_size=4"):
        candidates(66, 4)


def test_the_largest_size_that_fits_is_taken_and_none_when_nothing_does():
    tried = []

    def fits(size: int) -> bool:  # a memory that holds 12 samples' step
        tried.append(size)
        return size <= 12

    assert largest_that_fits(candidates(64, 2), fits) == 8
    assert tried == [32, 16, 8]  # largest first, stops at the first that fits
    assert largest_that_fits([4, 2, 1], lambda size: False) is None


@pytest.mark.slow
def test_the_ranks_agree_on_the_smallest_before_any_process_group(tmp_path):
    out = harness.run([*harness.torchrun(2), str(harness.ROOT / "tests/workers/agree_min.py")])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rank 0: offered 16, agreed 8" in out.stdout
    assert "rank 1: offered 8, agreed 8" in out.stdout


@pytest.mark.slow
def test_auto_is_refused_without_a_gpu(digits_root, tmp_path):
    overrides = smoke_overrides(digits_root, tmp_path, "auto", "batch.micro_size=auto")
    out = harness.train([*overrides, "trainer.device=cpu"], nproc=0)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.startswith("error: batch.micro_size=auto needs a CUDA GPU")
    assert len(out.stderr.splitlines()) == 1 and not (tmp_path / "auto").exists()
    plan = harness.run([sys.executable, "-m", "ddp.plan_cli", *overrides])
    assert plan.returncode == 2 and "batch.micro_size=auto is found on the GPU" in plan.stderr
