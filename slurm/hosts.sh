#!/usr/bin/env bash
# Hosts on this machine that look real to torchrun, gloo and SLURM: each host is a
# network namespace (its own interfaces, addresses and ports), a UTS namespace (its
# own hostname) and a mount namespace (its own /etc/hosts), linked by veth pairs to
# one bridge. Nothing leaves the machine: the hosts have no default route, and the
# subnet is a private /24 of our own.
#
#   slurm/hosts.sh up [N]               # node1..nodeN (default 2) at SUBNET.11, .12, ...
#   slurm/hosts.sh exec HOST -- CMD...  # run CMD on HOST (same file system, same cwd)
#   slurm/hosts.sh kill HOST            # SIGKILL every process on HOST (a host that dies)
#   slurm/hosts.sh block HOST PORT      # drop TCP to PORT arriving at HOST (a firewall)
#   slurm/hosts.sh unblock HOST
#   slurm/hosts.sh status
#   slurm/hosts.sh down                 # kill what runs on the hosts, remove them
#
# Each host's /etc/hosts names every host, and (as Debian's installer writes it) the
# host's own name also on 127.0.1.1: the set-up in which gloo, left alone, binds to
# loopback and peers on other hosts cannot reach it (ddp.distributed.network picks the interface).
# This machine's own /etc/hosts is not touched.
#
# Needs root (namespaces, links, mounts). `up` is idempotent.
#
# Environment (all optional):
#   DDP_HOSTS_SUBNET  first three octets of the hosts' /24 (10.77.0); the bridge is .1
#   DDP_HOSTS_DIR     where the namespaces and /etc/hosts files live (/run/ddp-hosts)
set -euo pipefail

SUBNET="${DDP_HOSTS_SUBNET:-10.77.0}"
DIR="${DDP_HOSTS_DIR:-/run/ddp-hosts}"
BRIDGE=ddp-br0
PREFIX=ddp- # namespaces and the bridge end of each veth: ddp-node1, ...

say() { echo "[hosts] $*"; }
die() {
    echo "[hosts] error: $*" >&2
    exit 1
}

need_root() {
    [[ $EUID -eq 0 ]] || die "run as root (it creates namespaces, links and mounts)"
    local tool
    for tool in ip nsenter unshare mountpoint; do
        command -v "$tool" >/dev/null || die "$tool not found (Debian: iproute2, util-linux)"
    done
}

# The hosts that exist now, in order (node1 node2 ...).
hosts() {
    local path
    for path in "$DIR"/node*/uts; do
        if [[ -e $path ]]; then basename "$(dirname "$path")"; fi
    done | sort -V
}

host_ip() { echo "$SUBNET.$((10 + ${1#node}))"; }

netns_file() { echo "/run/netns/$PREFIX$1"; }

check_host() {
    [[ $1 =~ ^node[0-9]+$ && -e $DIR/$1/uts ]] || die "no host $1 (hosts: $(hosts | xargs))"
}

write_hosts_file() {
    local host=$1 count=$2 i
    {
        echo "127.0.0.1 localhost"
        echo "127.0.1.1 $host"
        for ((i = 1; i <= count; i++)); do
            echo "$(host_ip "node$i") node$i"
        done
    } >"$DIR/$host/hosts"
}

make_host() {
    local host=$1 count=$2 ns
    ns="$PREFIX$host"
    ip netns del "$ns" 2>/dev/null || true # left by an interrupted `up`
    ip netns add "$ns"
    # The veth's bridge end keeps the namespace's name: one glance at `ip link` says
    # which host it belongs to.
    ip link add "$ns" type veth peer name eth0 netns "$ns"
    ip link set "$ns" master "$BRIDGE" up
    ip -n "$ns" addr add "$(host_ip "$host")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    mkdir -p "$DIR/$host"
    write_hosts_file "$host" "$count"
    touch "$DIR/$host/uts" "$DIR/$host/mnt"
    # Persistent UTS and mount namespaces (bound to files, so `exec` can enter them).
    # slave: mounts made on the machine later still show up on the host, while the
    # host's own /etc/hosts stays its own.
    nsenter --net="$(netns_file "$host")" \
        unshare --uts="$DIR/$host/uts" --mount="$DIR/$host/mnt" --propagation slave \
        sh -c "hostname $host && mount --bind $DIR/$host/hosts /etc/hosts"
}

cmd_up() {
    need_root
    local count=${1:-2} existing
    [[ $count =~ ^[0-9]+$ ]] && ((count >= 1 && count <= 9)) || die "host count must be 1..9, not $count"
    existing=$(hosts | xargs)
    if [[ -n $existing ]]; then
        [[ $existing == "$(seq -f 'node%g' -s ' ' 1 "$count")" ]] && {
            say "already up: $existing"
            return
        }
        die "other hosts are up ($existing): run '$0 down' first"
    fi
    mkdir -p "$DIR"
    # Namespace files can only be bound on a private mount (as /run/netns is).
    if ! mountpoint -q "$DIR"; then
        mount --bind "$DIR" "$DIR"
        mount --make-private "$DIR"
    fi
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
        ip addr add "$SUBNET.1/24" dev "$BRIDGE"
        ip link set "$BRIDGE" up
    fi
    local i
    for ((i = 1; i <= count; i++)); do
        make_host "node$i" "$count"
        say "node$i up at $(host_ip "node$i")"
    done
}

# Pids of the processes whose network namespace is HOST's.
host_pids() {
    local want pid
    want=$(stat -L -c %i "$(netns_file "$1")" 2>/dev/null) || return 0
    for pid in /proc/[0-9]*; do
        pid=${pid#/proc/}
        if [[ $(stat -L -c %i "/proc/$pid/ns/net" 2>/dev/null) == "$want" ]]; then
            echo "$pid"
        fi
    done
}

cmd_kill() {
    need_root
    check_host "$1"
    local pids
    pids=$(host_pids "$1" | xargs)
    if [[ -n $pids ]]; then
        say "killing every process on $1: $pids"
        # shellcheck disable=SC2086  # a list of pids
        kill -KILL $pids 2>/dev/null || true
    fi
}

cmd_exec() {
    [[ $# -ge 1 ]] || die "usage: $0 exec HOST -- CMD..."
    local host=$1
    shift
    [[ ${1:-} == -- ]] && shift
    [[ $# -ge 1 ]] || die "usage: $0 exec HOST -- CMD..."
    check_host "$host"
    # --wd: entering a mount namespace would otherwise move us to its /.
    exec nsenter --net="$(netns_file "$host")" --uts="$DIR/$host/uts" \
        --mount="$DIR/$host/mnt" --wd="$PWD" -- "$@"
}

nft_on() {
    if ! command -v nft >/dev/null; then
        say "installing nftables (Debian package) for the firewall rule"
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nftables
    fi
    # The host's own netfilter tables: the rule lives and dies with its namespace.
    nsenter --net="$(netns_file "$1")" nft "${@:2}"
}

cmd_block() {
    need_root
    check_host "$1"
    [[ ${2:-} =~ ^[0-9]+$ ]] || die "usage: $0 block HOST PORT"
    nft_on "$1" add table inet ddp_hosts
    nft_on "$1" "add chain inet ddp_hosts input { type filter hook input priority 0 ; }"
    # drop, not reject: a firewall that answers nothing is the case that hangs.
    nft_on "$1" add rule inet ddp_hosts input iifname eth0 tcp dport "$2" drop
    say "TCP to $1:$2 from other hosts is dropped"
}

cmd_unblock() {
    need_root
    check_host "$1"
    nft_on "$1" delete table inet ddp_hosts 2>/dev/null || true
}

# The hosts that exist, also those half made by an interrupted `up` (a namespace
# without its files), so that `down` leaves nothing behind.
all_hosts() {
    {
        hosts
        ip netns list 2>/dev/null | awk -v ns="${PREFIX}node" \
            'index($1, ns) == 1 { print substr($1, length(ns) - 3) }'
    } | sort -uV
}

cmd_down() {
    need_root
    local host pids i
    for host in $(all_hosts); do
        pids=$(host_pids "$host" | xargs)
        [[ -n $pids ]] || continue
        # shellcheck disable=SC2086  # a list of pids
        kill -KILL $pids 2>/dev/null || true
        # A namespace lives on while a process in it does: wait for them to go.
        for ((i = 0; i < 50; i++)); do
            [[ -z $(host_pids "$host") ]] && break
            sleep 0.1
        done
    done
    for host in $(all_hosts); do
        umount "$DIR/$host/mnt" "$DIR/$host/uts" 2>/dev/null || true
        ip netns del "$PREFIX$host" 2>/dev/null || true # its veth goes with it
        rm -rf "${DIR:?}/$host"
        say "$host down"
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    if mountpoint -q "$DIR"; then
        umount "$DIR"
    fi
    rmdir "$DIR" 2>/dev/null || true
}

cmd_status() {
    local host up=1
    for host in $(hosts); do
        up=0
        echo "$host $(host_ip "$host") processes: $(host_pids "$host" | wc -l)"
    done
    return $up
}

action=${1:-}
shift || true
case $action in
    up) cmd_up "$@" ;;
    down) cmd_down ;;
    exec) cmd_exec "$@" ;;
    kill) cmd_kill "$@" ;;
    block) cmd_block "$@" ;;
    unblock) cmd_unblock "$@" ;;
    status) cmd_status ;;
    *)
        sed -n '2,25p' "${BASH_SOURCE[0]}" >&2
        exit 2
        ;;
esac
