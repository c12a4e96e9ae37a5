#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying and testing the SLURM
# path of ddp (sbatch, srun + torchrun, requeue, Hydra's submitit launcher)
# without a real cluster.
#
#   slurm/cluster.sh start    # install if needed, configure, start, wait for the node
#   slurm/cluster.sh status   # daemons, node, queue
#   slurm/cluster.sh stop     # stop slurmd, slurmctld and munged
#
# Needs root (it installs packages, writes /etc/slurm/slurm.conf and runs the
# daemons). `start` is idempotent: when everything already runs with the same
# configuration it only checks the node and returns.
#
# Environment (all optional):
#   SLURM_CLUSTER_TIMEOUT  seconds to wait for the node to become idle (60)
#   SLURM_CLUSTER_CPUS     CPUs the node offers (default: nproc)
set -euo pipefail

SLURM_ETC=/etc/slurm
SLURM_CONF="$SLURM_ETC/slurm.conf"
STATE_DIR=/var/lib/slurm
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
MUNGE_KEY=/etc/munge/munge.key
MUNGE_RUN=/run/munge
MUNGE_PID="$MUNGE_RUN/munged.pid"
CTLD_PID="$RUN_DIR/slurmctld.pid"
SLURMD_PID="$RUN_DIR/slurmd.pid"
MARKER="# managed by ddp slurm/cluster.sh"
TIMEOUT="${SLURM_CLUSTER_TIMEOUT:-60}"

NODE="$(hostname -s)"

say() { echo "[cluster] $*"; }
die() { echo "[cluster] error: $*" >&2; exit 1; }

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
        # munged refuses to run as root; Debian runs it as the munge user.
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

render_conf() {
    # GNU nproc honours OMP_NUM_THREADS (make test sets it to 1): ask without it.
    local cpus="${SLURM_CLUSTER_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"
    cat <<EOF
$MARKER (regenerated on every start; edit the script, not this file)
ClusterName=ddp
SlurmctldHost=$NODE
# Root runs everything: this is a single-user test cluster.
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again cred_expire + 1 s after the requeue (default
# 120 s). 10 s keeps preemption tests short; step launches here take < 1 s.
AuthInfo=cred_expire=10
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
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
SlurmdTimeout=300
NodeName=$NODE CPUs=$cpus RealMemory=$(real_memory_mb) State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
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
    say "writing $SLURM_CONF (node $NODE)"
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

start_slurm() {
    install -d -m 0755 "$RUN_DIR" "$LOG_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd"
    if running "$CTLD_PID" slurmctld; then
        say "slurmctld already running (pid $(<"$CTLD_PID"))"
    else
        say "starting slurmctld"
        # Without -c: keep the saved state, so queued and requeued jobs survive.
        slurmctld
    fi
    if running "$SLURMD_PID" slurmd; then
        say "slurmd already running (pid $(<"$SLURMD_PID"))"
    else
        say "starting slurmd"
        slurmd
    fi
}

node_state() {
    sinfo --noheader --nodes="$NODE" --format=%T 2>/dev/null | head -1
}

wait_idle() {
    local deadline=$((SECONDS + TIMEOUT)) state="" resumed=0
    say "waiting up to ${TIMEOUT}s for node $NODE to be idle"
    while ((SECONDS < deadline)); do
        state=$(node_state || true)
        case $state in
            idle | mixed | allocated | completing)
                say "node $NODE is $state"
                return 0
                ;;
            down* | drain* | fail* | inval*)
                # Left down or drained by an earlier run of the daemons.
                if ((!resumed)); then
                    say "node is $state: resuming it"
                    scontrol update NodeName="$NODE" State=RESUME || true
                    resumed=1
                fi
                ;;
        esac
        sleep 1
    done
    echo "[cluster] error: node $NODE not idle after ${TIMEOUT}s (state: '${state:-unknown}')" >&2
    scontrol show node "$NODE" >&2 || true
    echo "[cluster] last lines of $LOG_DIR/slurmctld.log and slurmd.log:" >&2
    tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
    exit 1
}

cmd_start() {
    need_root
    install_packages
    start_munge
    if write_conf; then
        # A changed configuration (or a first start) needs fresh daemons.
        kill_daemon "$SLURMD_PID" slurmd
        kill_daemon "$CTLD_PID" slurmctld
    fi
    start_slurm
    wait_idle
    sinfo
}

cmd_stop() {
    need_root
    kill_daemon "$SLURMD_PID" slurmd
    kill_daemon "$CTLD_PID" slurmctld
    kill_daemon "$MUNGE_PID" munged
    say "stopped"
}

cmd_status() {
    local ok=0
    local pidfile name
    while read -r pidfile name; do
        if running "$pidfile" "$name"; then
            say "$name running (pid $(<"$pidfile"))"
        else
            say "$name not running"
            ok=1
        fi
    done <<<"$MUNGE_PID munged
$CTLD_PID slurmctld
$SLURMD_PID slurmd"
    if ((ok == 0)); then
        sinfo
        squeue
    fi
    return $ok
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac
