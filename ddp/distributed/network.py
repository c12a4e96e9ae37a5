"""The network of a job across hosts: which interface the process group binds to,
whether the rendezvous host can be reached at all, and whether the rendezvous port on it
is free for the store. No torch import.

Left alone, gloo binds to the address its host's own name resolves to. On a machine
whose /etc/hosts maps its name to 127.0.1.1 (Debian's installer writes that line) it is
loopback: peers on other hosts then dial their own loopback and the job fails at start
with "Gloo connectFullMesh failed ... Connection refused, remote=[127.0.1.1]" (seen on
the namespace hosts of slurm/hosts.sh). NCCL's bootstrap picks an interface by its own
rules, which on a node with several networks need not be the one the other nodes reach.

`use_interface_towards_master` chooses for both, when the user has not: the interface
that holds the source address of this host's route to MASTER_ADDR (rank 0's host), i.e.
the network on which the other hosts reach rank 0. Routes are read from the kernel by
connecting a UDP socket, which sends nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import ipaddress
import os
import socket
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

from ddp.distributed.env import Launch
from ddp.errors import ConfigError

SOCKET_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


@dataclass(frozen=True)
class Route:
    interface: str
    source: str
    """This host's address on `interface`: what the process group binds to."""
    destination: str


def this_host() -> str:
    return socket.gethostname()


def resolve(host: str, what: str = "host") -> list[str]:
    """Every address of `host`, non-loopback first; ConfigError naming the host (and the
    host that asked) when it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise ConfigError(
            f"{what} {host} does not resolve on {this_host()} ({exc.strerror})"
        ) from exc
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    return sorted(addresses, key=lambda a: ipaddress.ip_address(a.split("%")[0]).is_loopback)


def route_to(host: str) -> Route | None:
    """The interface and source address this host uses to reach `host` (its first
    address that is not loopback, if it has one); None when no interface holds the
    source address (no route, or an OS without getifaddrs)."""
    owners = local_addresses()
    for address in resolve(host, "MASTER_ADDR"):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect((address, 9))  # UDP: picks the route, sends nothing
                source = probe.getsockname()[0].split("%")[0]  # no IPv6 scope: fe80::1%eth0
        except OSError:  # no route to this address: try the next one
            continue
        if source in owners:
            return Route(owners[source], source, address)
    return None


def use_interface_towards_master(
    launch: Launch, environ: MutableMapping[str, str] | None = None
) -> Route | None:
    """For a job that spans hosts, set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME (each
    only when unset) to the interface of the route to MASTER_ADDR. Returns the route
    when it set one; None for a one-host job, when both are set already, or when no
    interface holds the route's source address (the libraries' defaults then stand).
    ConfigError when MASTER_ADDR does not resolve on this host."""
    environ = os.environ if environ is None else environ
    unset = [name for name in SOCKET_IFNAME_VARS if not environ.get(name)]
    master = environ.get("MASTER_ADDR")
    if launch.world_size == launch.local_world_size or not unset or not master:
        return None  # every rank on this host: any interface reaches the others
    route = route_to(master)
    if route is None:
        return None
    for name in unset:
        environ[name] = route.interface
    return route


def wait_for_rendezvous(host: str, port: int, timeout_s: float, run_id: str) -> None:
    """Before torchrun's agent joins the c10d rendezvous `run_id`: `host` resolves here;
    on the rendezvous host, `port` is free or served by an agent of `run_id`
    (check_rendezvous_port); elsewhere, `host:port` accepts a TCP connection within
    `timeout_s` (the other agents may still be starting). One ConfigError line naming
    both hosts otherwise: torch would retry until its own timeouts, with a C++ stack
    trace per attempt, and end in a traceback."""
    addresses = resolve(host, "rendezvous host")
    here = local_addresses()
    if any(a in here or ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        check_rendezvous_port(port, run_id)
        return  # our agent will serve the store
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout_s)):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                reason = exc.strerror or str(exc) or type(exc).__name__
                raise ConfigError(
                    f"cannot reach the rendezvous {host}:{port} from {this_host()} within "
                    f"{timeout_s:g} s ({reason}): is torchrun running on {host}, and is port "
                    f"{port} open to the other hosts?"
                ) from exc
        time.sleep(0.5)


def check_rendezvous_port(port: int, run_id: str) -> None:
    """On the rendezvous host: ConfigError when `port` is taken by anything but an agent
    of the rendezvous `run_id` (several agents on one host share the first one's store).

    torch's agent, finding the port taken, silently becomes a client of whatever listens
    there: another job's store (whose rendezvous it then joins), or one about to go away,
    and every agent of the job then fails with a store error, exit 1, once it does."""
    if not port_in_use(port):
        return
    holders = {pid: command_line(pid) for pid in listening_pids(port)}
    if any(rendezvous_id(argv) == run_id for argv in holders.values()):
        return
    by = " by " + ", ".join(_process(pid, argv) for pid, argv in holders.items()) if holders else ""
    raise ConfigError(
        f"the rendezvous port {port} on {this_host()} is already in use{by}, not by an "
        f"agent of rendezvous '{run_id}': another job's? pick a free port for the "
        "rendezvous endpoint"
    )


def _process(pid: int, argv: list[str]) -> str:
    """ "pid 12 (torchrun, rendezvous 'exp1')", "pid 13 (nginx)"."""
    what = os.path.basename(argv[0]) if argv else "?"
    if what.startswith("python") and len(argv) > 1:  # python -m ddp.launch, a script
        what = argv[2] if argv[1] == "-m" and len(argv) > 2 else os.path.basename(argv[1])
    rdzv = rendezvous_id(argv)
    return f"pid {pid} ({what}{f', rendezvous {rdzv!r}' if rdzv else ''})"


def port_in_use(port: int) -> bool:
    """True when a TCP socket of this network namespace listens on `port` (binding it
    on every IPv4 address fails with EADDRINUSE; connections in TIME_WAIT do not count,
    as they do not for the store's own bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def listening_pids(port: int) -> list[int]:
    """The processes this user may inspect that hold a TCP socket listening on `port` in
    this network namespace (Linux /proc; empty elsewhere)."""
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:  # sl local_address rem_address st ... inode
            fields = row.split()
            if fields[3] == _TCP_LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                sockets.add(f"socket:[{fields[9]}]")
    if not sockets:
        return []
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in sockets for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
        except OSError:  # gone, or not ours to inspect
            continue
    return sorted(pids)


def command_line(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def rendezvous_id(argv: list[str]) -> str | None:
    """The rendezvous id of a torchrun command line: its --rdzv-id (or --rdzv_id), else
    torchrun's default "none" where it names a --rdzv-endpoint; None for other commands."""
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name in ("--rdzv-id", "--rdzv_id"):
            return value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    endpoint = any(arg.partition("=")[0] in ("--rdzv-endpoint", "--rdzv_endpoint") for arg in argv)
    return "none" if endpoint else None


_TCP_LISTEN = "0A"
"""The state column of a listening socket in /proc/net/tcp."""


def local_addresses() -> dict[str, str]:
    """Every address of this host's interfaces, IPv4 and IPv6, mapped to its interface
    name (glibc's getifaddrs); empty where that is not available."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return {}
    libc = ctypes.CDLL(libc_name, use_errno=True)
    head = ctypes.POINTER(_IfAddrs)()
    if not hasattr(libc, "getifaddrs") or libc.getifaddrs(ctypes.byref(head)) != 0:
        return {}
    owners: dict[str, str] = {}
    try:
        node = head
        while node:
            entry = node.contents
            address = _address(entry.ifa_addr)
            if address is not None:
                owners.setdefault(address, entry.ifa_name.decode())
            node = entry.ifa_next
    finally:
        libc.freeifaddrs(head)
    return owners


class _SockAddr(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("data", ctypes.c_ubyte * 26)]


class _IfAddrs(ctypes.Structure):
    pass


_IfAddrs._fields_ = [
    ("ifa_next", ctypes.POINTER(_IfAddrs)),
    ("ifa_name", ctypes.c_char_p),
    ("ifa_flags", ctypes.c_uint),
    ("ifa_addr", ctypes.POINTER(_SockAddr)),
    ("ifa_netmask", ctypes.POINTER(_SockAddr)),
    ("ifa_ifu", ctypes.POINTER(_SockAddr)),
    ("ifa_data", ctypes.c_void_p),
]


def _address(pointer) -> str | None:
    """The text of a sockaddr_in (port, then 4 bytes) or sockaddr_in6 (port, flow
    info, then 16 bytes); None for other families (e.g. AF_PACKET)."""
    if not pointer:
        return None
    sockaddr = pointer.contents
    raw = bytes(sockaddr.data)
    if sockaddr.family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[2:6])
    if sockaddr.family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw[6:22])
    return None
