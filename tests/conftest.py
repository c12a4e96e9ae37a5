import pytest

from tests import harness

pytest_plugins = ["tests.fixtures", "tests.servers", "tests.refusals"]


@pytest.fixture(autouse=True)
def no_process_left_behind():
    """Whatever a test started (torchrun, its workers, their children) ends with the test,
    passed or failed. Module fixtures start theirs before this runs and end them with the
    module."""
    before = harness.running()
    yield
    harness.kill_running(keep=before)


CLUSTER_MODULES = ("tests/test_slurm.py", "tests/test_hosts.py")
"""The tests that start, use and stop the machine's SLURM daemons and namespace hosts:
under pytest-xdist (`make test` runs 2 workers, `--dist loadgroup`) their
`xdist_group("cluster")` runs them in one worker, one after another; every other test
starts its own processes on free ports."""


def pytest_xdist_node_collection_finished(node, ids: list[str]) -> None:
    """xdist groups tests by appending "@group" to their node ids on the workers. Where
    that does not work (pytest 9.2 with xdist 3.8: pytest-xdist#1386, hence the pin in
    pyproject.toml; or a group mark added by a hook that runs after xdist's) both
    workers run cluster tests, which then share node1's rendezvous port and the hosts
    and fail now and then: stop at once instead."""
    if node.config.getoption("dist") != "loadgroup":
        return
    lost = [i for i in ids if i.startswith(CLUSTER_MODULES) and "@" not in i.rsplit("::", 1)[-1]]
    if lost:
        pytest.exit(
            f"pytest-xdist --dist loadgroup ignored the group of {lost[0]} (and "
            f"{len(lost) - 1} more) under pytest {pytest.__version__} (pytest-xdist#1386): "
            "install the pytest that pyproject.toml pins",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )
