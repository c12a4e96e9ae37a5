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
