"""Run the trainer as a user would: real processes, torchrun, gloo, nothing mocked.

One way to start a command, wait for it and end it. torchrun starts each worker in a
session of its own, so a process-group kill would leave the workers behind (holding our
pipes): every kill here walks the process tree with psutil, and a `Running` remembers
each descendant it has seen, so a worker whose agent died first is still found.
Every process started here is killed at the end of the test that started it
(conftest.py), whatever happened; a module fixture's, at the end of the module.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

_started: list[Running] = []
"""Every command started and not yet finished (or killed), oldest first."""


def environment(unset: Iterable[str] = (), **extra: str) -> dict[str, str]:
    """Our environment for a child: this checkout first on PYTHONPATH, one thread, W&B
    offline; without the variables named (or prefixed) in `unset`."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(tuple(unset))}
    path = [str(ROOT), *filter(None, [out.get("PYTHONPATH")])]
    out.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true")
    out.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(path))
    out.update(extra)
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant, whatever session each one is in, the
    deepest first: a crash takes a host's processes at once, and a worker that outlived
    its agent by a moment would get its PR_SET_PDEATHSIG SIGTERM and stop gracefully
    (a preemption agreed with its peers) instead of vanishing."""
    try:
        root = psutil.Process(pid)
        descendants = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    pids = {p.pid for p in descendants}

    def depth(process: psutil.Process) -> int:
        try:
            return len([a for a in process.parents() if a.pid in pids])
        except psutil.NoSuchProcess:
            return 0

    _kill([*sorted(descendants, key=depth, reverse=True), root])


def _kill(processes: Iterable[psutil.Process]) -> None:
    alive = []
    for process in processes:
        try:
            process.kill()  # psutil refuses a pid that now belongs to another process
            alive.append(process)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


class Running:
    """A command running in the background, in a session of its own."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: Path, merge_stderr: bool):
        self.args = cmd
        self.popen = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        self._seen: set[psutil.Process] = set()
        self._result: subprocess.CompletedProcess | None = None
        _started.append(self)

    def descendants(self) -> list[psutil.Process]:
        """The live descendants now (remembered, so that orphans are found later)."""
        if self.popen.returncode is None:  # not reaped yet: the pid is still ours
            try:
                self._seen.update(psutil.Process(self.pid).children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        return [p for p in self._seen if p.is_running()]

    def poll(self) -> int | None:
        return self.popen.poll()

    def send_signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def worker(self, rank: int, timeout: float = 60) -> psutil.Process:
        """The torchrun worker whose environment has RANK=`rank` (not its own children,
        which inherit it)."""
        deadline = time.monotonic() + timeout
        while True:
            ranked = {}  # pid -> (process, parent pid)
            for process in self.descendants():
                try:
                    if process.environ().get("RANK") == str(rank):
                        ranked[process.pid] = (process, process.ppid())
                except psutil.NoSuchProcess:  # ZombieProcess included
                    pass
            top = [process for process, parent in ranked.values() if parent not in ranked]
            if len(top) == 1:
                return top[0]
            if self.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no worker with RANK={rank} under {self.pid}: {top}")
            time.sleep(0.05)

    def wait_for_file(self, path: Path, timeout: float = 90) -> None:
        """Block until `path` exists; fail with the output if the command ends first."""
        self.wait_until(path.exists, f"{path} never appeared", timeout)

    def wait_for_record(
        self, run_dir: Path, kind: str, count: int = 1, timeout: float = 90
    ) -> None:
        """Block until the run's metrics.jsonl holds `count` records of `kind` (steps
        logged, epochs validated): a test's next move ordered after the run's progress.
        Fails with the output if the command ends first."""
        path = run_dir / "metrics.jsonl"

        def done() -> bool:
            return len(written_records(path, kind)) >= count

        self.wait_until(done, f"{path} never held {count} {kind!r} record(s)", timeout)

    def wait_until(self, done: Callable[[], bool], failure: str, timeout: float = 90) -> None:
        """Poll `done` until it is true; fail with `failure` and the command's output if
        the command ends first or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while not done():
            if self.poll() is not None or time.monotonic() > deadline:
                self.kill()
                out = self.finish(timeout=30)
                raise AssertionError(f"{failure}:\n{out.stdout[-2000:]}{out.stderr}")
            self.descendants()
            time.sleep(0.05)

    def finish(self, timeout: float = 240) -> subprocess.CompletedProcess:
        """Wait for the command to end; then (or on timeout) kill whatever it left running.
        Once it has ended, its result again."""
        if self._result is not None:
            return self._result
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:  # retrying communicate() loses no output
                    out, err = self.popen.communicate(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    self.descendants()
                    if time.monotonic() > deadline:
                        self.kill()
                        out, err = self._rest_of_output()
                        raise AssertionError(
                            f"timed out after {timeout}s: {' '.join(self.args)}\n{out}\n{err}"
                        ) from None
        finally:
            self.kill()
        self._result = subprocess.CompletedProcess(self.args, self.popen.returncode, out, err or "")
        return self._result

    def _rest_of_output(self) -> tuple[str, str]:
        try:
            return self.popen.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # held open by a process never seen
            return "", ""

    def kill(self) -> None:
        """SIGKILL the command and every descendant seen, and reap the command."""
        if self in _started:
            _started.remove(self)
        family = self.descendants()
        self.popen.kill()  # a no-op once it has ended
        _kill(family)
        try:  # anything of its process group that was never seen as a descendant
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.popen.wait()


def start(
    cmd: list[str],
    *,
    cwd: Path = ROOT,
    merge_stderr: bool = False,
    unset: Iterable[str] = (),
    **env: str,
) -> Running:
    """Start `cmd` in the background with `environment(unset, **env)`."""
    return Running(cmd, environment(unset, **env), cwd, merge_stderr)


def run(cmd: list[str], timeout: float = 240, **options) -> subprocess.CompletedProcess:
    """Run `cmd` to its end (options as for `start`); fail after `timeout` seconds."""
    return start(cmd, **options).finish(timeout)


def running() -> list[Running]:
    """The commands started and not yet finished (or killed)."""
    return list(_started)


def kill_running(keep: Iterable[Running] = ()) -> None:
    """Kill every command still running but those in `keep`, and all they left behind."""
    kept = set(keep)
    for command in [c for c in _started if c not in kept]:
        command.kill()


atexit.register(kill_running)  # an interrupted session leaves nothing running either


def torchrun(nproc: int = 2, *extra_torchrun: str) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", *extra_torchrun]


def trainer(overrides: list[str], nproc: int = 2, torchrun_args: Iterable[str] = ()) -> list[str]:
    """The trainer's command line: torchrun with `nproc` processes, or plain python (0)."""
    if nproc == 0:
        return [sys.executable, "-m", "ddp.train", *overrides]
    return [*torchrun(nproc, *torchrun_args), "-m", "ddp.train", *overrides]


def train(
    overrides: list[str], nproc: int = 2, timeout: float = 240, torchrun_args=(), **env: str
) -> subprocess.CompletedProcess:
    return run(trainer(overrides, nproc, torchrun_args), timeout=timeout, **env)


def records(run_dir: Path, kind: str | None = None) -> list[dict]:
    """The run's metrics.jsonl records (of one kind)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return [r for r in rows if kind is None or r.get("kind") == kind]


def written_records(path: Path, kind: str) -> list[dict]:
    """The records of `kind` in a metrics.jsonl a run is writing: its whole lines (the
    last may be half-written), none before the file exists."""
    try:
        lines = path.read_text().split("\n")[:-1]
    except FileNotFoundError:
        return []
    rows = [json.loads(line) for line in lines if line.strip()]
    return [r for r in rows if r.get("kind") == kind]


@functools.cache
def wandb_inspect(offline_run: Path, *flags: str) -> str:
    """`wandb leet inspect FLAGS --json RUN`: W&B's own reader of an offline run. It takes
    ~2 s a call, so each answer is kept: read a run only once it has finished."""
    cmd = [str(BIN / "wandb"), "leet", "inspect", *flags, "--json", str(offline_run)]
    out = run(cmd, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout
