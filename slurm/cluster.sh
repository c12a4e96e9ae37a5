#!/usr/bin/env bash
# A SLURM cluster on this machine, for trying and testing the SLURM path of ddp
# (sbatch, srun + torchrun, requeue, Hydra's submitit launcher) without a real one.
#
#   slurm/cluster.sh start    # one node (this machine): install if needed, configure,
#                             # start, wait for the node
#   slurm/cluster.sh status   # daemons, nodes, queue
#   slurm/cluster.sh stop     # stop slurmd, slurmctld and munged
#
#   slurm/cluster.sh --hosts 2 start   # two nodes, node1 and node2: each a host made by
#                                      # slurm/hosts.sh (own network, hostname, /etc/hosts)
#   export SLURM_CONF=/etc/slurm/ddp-hosts/slurm.conf   # sbatch -N 2 ... then goes there
#   slurm/cluster.sh --hosts 2 stop    # stop its daemons and remove the hosts
#
# The hosts' cluster is separate from the one-node cluster (its own slurm.conf, state,
# logs and pid files; slurmctld runs on node1, one slurmd on each host), so both can run
# at once; they share munged. A node of the hosts' cluster that stops answering is down
# within seconds (SlurmdTimeout=6), and its --requeue jobs are requeued.
#
# Needs root (it installs packages, writes under /etc/slurm and runs the daemons).
# `start` is idempotent: when everything already runs with the same configuration it
# only checks the nodes (and starts a slurmd that is missing) and returns.
#
# Environment (all optional):
#   SLURM_CLUSTER_TIMEOUT  seconds to wait for the nodes to become idle (60)
#   SLURM_CLUSTER_CPUS     CPUs each node offers (default: nproc)
#   SLURM_CLUSTER_HOSTS    the same as --hosts (0: the one-node cluster)
set -euo pipefail

say() { echo "[cluster] $*"; }
die() { echo "[cluster] error: $*" >&2; exit 1; }

HOSTS="${SLURM_CLUSTER_HOSTS:-0}"
case ${1:-} in
    --hosts) HOSTS=${2:-}; shift 2 || true ;;
    --hosts=*) HOSTS=${1#*=}; shift ;;
esac
[[ $HOSTS =~ ^[0-9]$ ]] || die "--hosts takes a number of hosts from 1 to 9, not '$HOSTS'"
HOSTS_SH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/hosts.sh"

MUNGE_KEY=/etc/munge/munge.key
MUNGE_RUN=/run/munge
MUNGE_PID="$MUNGE_RUN/munged.pid"
MARKER="# managed by ddp slurm/cluster.sh"
TIMEOUT="${SLURM_CLUSTER_TIMEOUT:-60}"
if ((HOSTS == 0)); then
    SLURM_ETC=/etc/slurm
    STATE_DIR=/var/lib/slurm
    LOG_DIR=/var/log/slurm
    RUN_DIR=/run/slurm
    NODES=("$(hostname -s)")
    SLURMD_TIMEOUT=300
    CRED_EXPIRE=10
else
    # Paths of its own everywhere: the one-node cluster may run beside it.
    SLURM_ETC=/etc/slurm/ddp-hosts
    STATE_DIR=/var/lib/slurm/ddp-hosts
    LOG_DIR=/var/log/slurm/ddp-hosts
    RUN_DIR=/run/slurm-ddp-hosts
    mapfile -t NODES < <(seq -f 'node%g' 1 "$HOSTS")
    SLURMD_TIMEOUT=6
    CRED_EXPIRE=5 # SLURM's minimum: its jobs are requeued twice in one test
fi
CTLD_HOST=${NODES[0]}
SLURM_CONF="$SLURM_ETC/slurm.conf"
export SLURM_CONF # every slurm command and daemon below reads this one
CTLD_PID="$RUN_DIR/slurmctld.pid"
NODE_LIST=$(IFS=, && echo "${NODES[*]}")

need_root() {
    [[ $EUID -eq 0 ]] || die "run as root (it installs packages and starts daemons)"
}

# True when the pid file names a live process whose command is $2. Checking
# the name guards against a stale pid file whose pid was reused.
running() {
    local pidfile=$1 name=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ -r /proc/$pid/comm ]] || return 1
    [[ $(</proc/"$pid"/comm) == "$name"* ]]
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    if ((${#missing[@]} == 0)); then
        return
    fi
    say "installing ${missing[*]} (Debian packages)"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        slurmctld slurmd slurm-client munge
}

start_munge() {
    # The key authenticates every message between SLURM daemons and clients.
    if [[ ! -s $MUNGE_KEY ]]; then
        say "creating munge key $MUNGE_KEY"
        install -d -o munge -g munge -m 0700 /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY"
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
    install -d -o munge -g munge -m 0755 "$MUNGE_RUN" /var/lib/munge /var/log/munge

    if running "$MUNGE_PID" munged; then
        say "munged already running (pid $(<"$MUNGE_PID"))"
    else
        say "starting munged"
        rm -f "$MUNGE_PID" "$MUNGE_RUN/munge.socket.2"*
        # munged refuses to run as root; Debian runs it as the munge user. Its socket
        # is a file, so the hosts of slurm/hosts.sh (other network namespaces) reach it.
        runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID"
    fi
    local i
    for ((i = 0; i < 50; i++)); do
        if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
            return
        fi
        sleep 0.2
    done
    die "munge does not answer (munge -n | unmunge fails); see /var/log/munge/munged.log"
}

# Memory the node advertises: 90% of the physical memory, so that slurmd
# (which checks the real amount at registration) never finds less than
# configured and marks the node invalid.
real_memory_mb() {
    awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo
}

# A host's address (slurm/hosts.sh puts node N at SUBNET.(10 + N)).
node_addr() { echo "${DDP_HOSTS_SUBNET:-10.77.0}.$((10 + ${1#node}))"; }

# The daemons of the hosts' cluster are reached at their host's address; the one-node
# cluster's at whatever its name resolves to (as before).
with_addr() {
    if ((HOSTS > 0)); then echo "$1($(node_addr "$1"))"; else echo "$1"; fi
}

node_lines() {
    local cpus=$1 node addr=""
    for node in "${NODES[@]}"; do
        ((HOSTS > 0)) && addr=" NodeAddr=$(node_addr "$node")"
        echo "NodeName=$node$addr CPUs=$cpus RealMemory=$(real_memory_mb) State=UNKNOWN"
    done
}

# "-%n" (the node's name) in the slurmd paths of the hosts' cluster, so that its slurmd
# keep apart; nothing for the one-node cluster, whose paths stay as they always were.
per_node() {
    if ((HOSTS > 0)); then echo "-%n"; fi
}

slurmd_pid_file() {
    if ((HOSTS > 0)); then echo "$RUN_DIR/slurmd-$1.pid"; else echo "$RUN_DIR/slurmd.pid"; fi
}

render_conf() {
    # GNU nproc honours OMP_NUM_THREADS (make test sets it to 1): ask without it.
    local cpus="${SLURM_CLUSTER_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"
    local name=ddp
    ((HOSTS > 0)) && name=ddphosts
    cat <<EOF
$MARKER (regenerated on every start; edit the script, not this file)
ClusterName=$name
SlurmctldHost=$(with_addr "$CTLD_HOST")
# Root runs everything: this is a single-user test cluster.
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again cred_expire + 1 s after the requeue (default
# 120 s). 10 s keeps preemption tests short; step launches here take < 1 s.
AuthInfo=cred_expire=$CRED_EXPIRE
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd$(per_node)
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$RUN_DIR/slurmd$(per_node).pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd$(per_node).log
# No cgroups in containers: track step processes by parentage, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Look at pending jobs every few seconds (default 60 s / 30 s), so that a
# requeued job starts again as soon as it is eligible.
SchedulerParameters=sched_interval=5,bf_interval=5
# No accounting daemon: sacct does not work here, scontrol show job does.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# A node that went down (e.g. the machine restarted) comes back by itself.
ReturnToService=2
# Batch jobs may be requeued (scontrol requeue from the preemption trap).
JobRequeue=1
# Keep finished jobs visible to scontrol for an hour (tests read their state).
MinJobAge=3600
# Seconds between SIGTERM and SIGKILL when a job is cancelled or times out.
KillWait=30
InactiveLimit=0
SlurmctldTimeout=120
SlurmdTimeout=$SLURMD_TIMEOUT
$(node_lines "$cpus")
PartitionName=debug Nodes=$NODE_LIST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

# Writes slurm.conf; returns 0 when it changed (daemons must be restarted).
write_conf() {
    local new
    new=$(render_conf)
    if [[ -f $SLURM_CONF ]] && [[ $(<"$SLURM_CONF") == "$new" ]]; then
        return 1
    fi
    if [[ -f $SLURM_CONF ]] && ! grep -qF "$MARKER" "$SLURM_CONF"; then
        say "keeping the previous $SLURM_CONF as $SLURM_CONF.orig"
        cp -p "$SLURM_CONF" "$SLURM_CONF.orig"
    fi
    say "writing $SLURM_CONF (nodes $NODE_LIST)"
    install -d -m 0755 "$SLURM_ETC"
    printf '%s\n' "$new" >"$SLURM_CONF.tmp"
    mv "$SLURM_CONF.tmp" "$SLURM_CONF"
    return 0
}

# kill_daemon PIDFILE NAME: SIGTERM, wait up to 10 s, then SIGKILL.
kill_daemon() {
    local pidfile=$1 name=$2 pid i
    if ! running "$pidfile" "$name"; then
        rm -f "$pidfile"
        return
    fi
    pid=$(<"$pidfile")
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        [[ -d /proc/$pid ]] || break
        sleep 0.1
    done
    if [[ -d /proc/$pid ]]; then
        say "$name did not stop in 10 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    rm -f "$pidfile"
}

# Run a daemon on NODE: on its host for the hosts' cluster, here for the one-node one.
on_node() {
    local node=$1
    shift
    if ((HOSTS > 0)); then
        "$HOSTS_SH" exec "$node" -- "$@"
    else
        "$@"
    fi
}

start_slurm() {
    install -d -m 0755 "$RUN_DIR" "$LOG_DIR" "$STATE_DIR/slurmctld"
    if running "$CTLD_PID" slurmctld; then
        say "slurmctld already running (pid $(<"$CTLD_PID"))"
    else
        say "starting slurmctld on $CTLD_HOST"
        # Without -c: keep the saved state, so queued and requeued jobs survive.
        on_node "$CTLD_HOST" slurmctld
    fi
    local node pidfile args
    for node in "${NODES[@]}"; do
        pidfile=$(slurmd_pid_file "$node")
        args=()
        if ((HOSTS > 0)); then
            install -d -m 0755 "$STATE_DIR/slurmd-$node"
            args=(-N "$node") # several slurmd share this machine's files: name each
        else
            install -d -m 0755 "$STATE_DIR/slurmd"
        fi
        if running "$pidfile" slurmd; then
            say "slurmd already running on $node (pid $(<"$pidfile"))"
        else
            say "starting slurmd on $node"
            on_node "$node" slurmd "${args[@]}"
        fi
    done
}

wait_idle() {
    local deadline=$((SECONDS + TIMEOUT)) states="" resumed=" " node state ready
    say "waiting up to ${TIMEOUT}s for $NODE_LIST to be idle"
    while ((SECONDS < deadline)); do
        states=$(sinfo --noheader --Node --nodes="$NODE_LIST" --format="%N %T" 2>/dev/null || true)
        ready=0
        while read -r node state; do
            case $state in
                idle | mixed | allocated | completing) ready=$((ready + 1)) ;;
                down* | drain* | fail* | inval*)
                    # Left down or drained by an earlier run of the daemons, or a
                    # host that was killed and came back.
                    if [[ $resumed != *" $node "* ]]; then
                        say "$node is $state: resuming it"
                        scontrol update NodeName="$node" State=RESUME || true
                        resumed+="$node "
                    fi
                    ;;
            esac
        done <<<"$states"
        if ((ready == ${#NODES[@]})); then
            say "ready: $(xargs <<<"$states")"
            return 0
        fi
        sleep 1
    done
    echo "[cluster] error: $NODE_LIST not idle after ${TIMEOUT}s (states: '$(xargs <<<"$states")')" >&2
    scontrol show node "$NODE_LIST" >&2 || true
    echo "[cluster] last lines of the logs in $LOG_DIR:" >&2
    tail -n 20 "$LOG_DIR"/*.log >&2 || true
    exit 1
}

cmd_start() {
    need_root
    install_packages
    if ((HOSTS > 0)); then
        "$HOSTS_SH" up "$HOSTS"
    fi
    start_munge
    if write_conf; then
        # A changed configuration (or a first start) needs fresh daemons.
        local node
        for node in "${NODES[@]}"; do
            kill_daemon "$(slurmd_pid_file "$node")" slurmd
        done
        kill_daemon "$CTLD_PID" slurmctld
    fi
    start_slurm
    wait_idle
    sinfo
    if ((HOSTS > 0)); then
        say "for sbatch, squeue, scontrol: export SLURM_CONF=$SLURM_CONF"
    fi
}

cmd_stop() {
    need_root
    local node
    for node in "${NODES[@]}"; do
        kill_daemon "$(slurmd_pid_file "$node")" slurmd
    done
    kill_daemon "$CTLD_PID" slurmctld
    if ((HOSTS > 0)); then
        "$HOSTS_SH" down
        rmdir "$RUN_DIR" 2>/dev/null || true
        # munged serves the one-node cluster too: leave it to that cluster's stop.
        running /run/slurm/slurmctld.pid slurmctld || kill_daemon "$MUNGE_PID" munged
    else
        kill_daemon "$MUNGE_PID" munged
    fi
    say "stopped"
}

cmd_status() {
    local ok=0 pidfile name node
    local daemons="$MUNGE_PID munged"$'\n'"$CTLD_PID slurmctld"
    for node in "${NODES[@]}"; do
        daemons+=$'\n'"$(slurmd_pid_file "$node") slurmd"
    done
    while read -r pidfile name; do
        if running "$pidfile" "$name"; then
            say "$name running (pid $(<"$pidfile"))"
        else
            say "$name not running ($pidfile)"
            ok=1
        fi
    done <<<"$daemons"
    if ((ok == 0)); then
        sinfo
        squeue
    fi
    return $ok
}

case "${1:-}" in
    config) render_conf ;; # what start writes to $SLURM_CONF
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 [--hosts N] start|stop|status" >&2
        exit 2
        ;;
esac
