"""The namespace hosts of slurm/hosts.sh (node1, node2: each its own network, hostname
and /etc/hosts) and the SLURM cluster on them (slurm/cluster.sh --hosts 2), used the way
a user does: commands run on a host through `slurm/hosts.sh exec`, jobs go in by sbatch.

DDP_TEST_HOSTS=0 skips these tests; DDP_TEST_HOSTS=1 lets the session build the hosts
(root only) and remove them at its end; unset uses hosts that are already up. The SLURM
cluster on them follows DDP_TEST_SLURM as the one-node cluster does (tests/slurm_helpers.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests import harness
from tests.harness import ROOT

HOSTS_SH = ROOT / "slurm" / "hosts.sh"
CLUSTER_SH = ROOT / "slurm" / "cluster.sh"
HOSTS = ("node1", "node2")
ADDRESSES = {"node1": "10.77.0.11", "node2": "10.77.0.12"}
HOSTS_SLURM_CONF = "/etc/slurm/ddp-hosts/slurm.conf"
"""The hosts' cluster's slurm.conf: every sbatch/scontrol of these tests names it."""


def script(path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one of our scripts to its end. Not through the harness, which kills whatever a
    command leaves running: here, namespaces' daemons that must outlive the call."""
    return subprocess.run(
        ["bash", str(path), *args], capture_output=True, text=True, timeout=timeout
    )


def hosts_up() -> bool:
    out = script(HOSTS_SH, "status", timeout=60)
    return out.returncode == 0 and all(f"{host} " in out.stdout for host in HOSTS)


def ensure_hosts() -> tuple[str | None, bool]:
    """(the reason to skip, or None; whether this call built the hosts)."""
    wish = os.environ.get("DDP_TEST_HOSTS", "")
    if wish == "0":
        return "DDP_TEST_HOSTS=0", False
    if not sys.platform.startswith("linux"):
        return "namespace hosts need Linux network, UTS and mount namespaces", False
    missing = [tool for tool in ("ip", "nsenter", "unshare") if shutil.which(tool) is None]
    if missing:
        return f"namespace hosts need {', '.join(missing)} (Debian: iproute2, util-linux)", False
    if hosts_up():
        return None, False
    if wish != "1":
        return "no namespace hosts: run `slurm/hosts.sh up` (root) or set DDP_TEST_HOSTS=1", False
    if os.geteuid() != 0:
        return "DDP_TEST_HOSTS=1 but not root: network namespaces need root", False
    out = script(HOSTS_SH, "up", str(len(HOSTS)))
    if out.returncode != 0:
        raise RuntimeError(f"slurm/hosts.sh up failed:\n{out.stdout}\n{out.stderr}")
    return None, True


def hosts_cluster_up() -> bool:
    """True when the hosts' slurmctld answers and both nodes are usable."""
    if shutil.which("sinfo") is None or not Path(HOSTS_SLURM_CONF).exists():
        return False
    cmd = ["sinfo", "--noheader", "--Node", "--format=%N %T"]
    try:
        out = harness.run(cmd, timeout=20, SLURM_CONF=HOSTS_SLURM_CONF)
    except AssertionError:  # timed out
        return False
    usable = ("idle", "mixed", "allocated", "completing")
    states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
    return out.returncode == 0 and all(states.get(h, "").rstrip("*~#") in usable for h in HOSTS)


def ensure_hosts_cluster() -> tuple[str | None, bool]:
    """(the reason to skip, or None; whether this call started the cluster)."""
    wish = os.environ.get("DDP_TEST_SLURM", "")
    if wish == "0":
        return "DDP_TEST_SLURM=0", False
    if hosts_cluster_up():
        return None, False
    if wish not in ("1", "start"):
        return (
            "no SLURM cluster on the hosts: run `slurm/cluster.sh --hosts 2 start` (root)"
            " or set DDP_TEST_SLURM=1"
        ), False
    out = script(CLUSTER_SH, "--hosts", str(len(HOSTS)), "start", timeout=900)
    if out.returncode != 0 or not hosts_cluster_up():
        raise RuntimeError(f"slurm/cluster.sh --hosts 2 start failed:\n{out.stdout}\n{out.stderr}")
    return None, True


def processes_on(host: str) -> dict[int, str]:
    """pid -> command line of every process in `host`'s network namespace (as
    `slurm/hosts.sh kill` finds them)."""
    try:
        want = os.stat(f"/run/netns/ddp-{host}").st_ino
    except FileNotFoundError:
        return {}
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.stat(proc / "ns" / "net").st_ino == want:
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:  # gone meanwhile
            continue
    return {pid: cmd.decode(errors="replace").strip() for pid, cmd in found.items()}


def on_host(host: str, cmd: list[str]) -> list[str]:
    """`cmd` run on `host` (its network, hostname and /etc/hosts; our file system and cwd).
    nsenter replaces the script, and the command nsenter, so the harness still sees the
    command's own process tree."""
    return [str(HOSTS_SH), "exec", host, "--", *cmd]
