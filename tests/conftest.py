import pytest

from tests import harness

pytest_plugins = ["tests.fixtures", "tests.servers"]


@pytest.fixture(autouse=True)
def no_process_left_behind():
    """Whatever a test started (torchrun, its workers, their children) ends with the test,
    passed or failed. Module fixtures start theirs before this runs and end them with the
    module."""
    before = harness.running()
    yield
    harness.kill_running(keep=before)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`make test` runs 2 workers, `--dist loadgroup`), the tests that
    start, use and stop the machine's SLURM daemons and namespace hosts run in one worker,
    one after another; every other test starts its own processes on free ports."""
    for item in items:
        if item.get_closest_marker("slurm") or item.get_closest_marker("hosts"):
            item.add_marker(pytest.mark.xdist_group("cluster"))
