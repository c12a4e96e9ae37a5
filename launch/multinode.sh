#!/usr/bin/env bash
# One torchrun agent on this node; the agents of all nodes meet at a c10d
# rendezvous hosted by the agent on the head node (no etcd needed). Run the same
# command on every node (slurm/train.sbatch does it through srun):
#
#   launch/multinode.sh --head node01:29500 --nnodes 2 --run-id exp1 [--nproc 8] \
#       [--max-restarts 0] [--] trainer.max_epochs=3 ...
#
# --head      host:port of the rendezvous; the host is one of the nodes (its agent
#             serves the store), reachable from all; the port free there
# --nnodes    number of nodes (agents), or MIN:MAX for an elastic range
# --run-id    the same on all nodes, unique per job (the rendezvous id; the run
#             directory is <experiment>[-<hash>], or run.name when given)
# --nproc     processes per node (default: visible GPUs, else 2 CPU processes)
# --node-rank not needed with c10d (ranks are assigned at rendezvous); accepted
#             for symmetry with static launchers and passed through
# Remaining arguments are Hydra overrides for the trainer.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    sed -n '2,20p' "${BASH_SOURCE[0]}" >&2
    exit 2
}

head_endpoint="" nnodes="" run_id="" nproc="${NPROC:-}" node_rank="" max_restarts=0
while (($#)); do
    case $1 in
        --head) head_endpoint=$2; shift 2 ;;
        --head=*) head_endpoint=${1#*=}; shift ;;
        --nnodes) nnodes=$2; shift 2 ;;
        --nnodes=*) nnodes=${1#*=}; shift ;;
        --run-id) run_id=$2; shift 2 ;;
        --run-id=*) run_id=${1#*=}; shift ;;
        --nproc | --nproc-per-node) nproc=$2; shift 2 ;;
        --nproc=* | --nproc-per-node=*) nproc=${1#*=}; shift ;;
        --node-rank) node_rank=$2; shift 2 ;;
        --node-rank=*) node_rank=${1#*=}; shift ;;
        --max-restarts) max_restarts=$2; shift 2 ;;
        --max-restarts=*) max_restarts=${1#*=}; shift ;;
        -h | --help) usage ;;
        --) shift; break ;;
        -*) echo "unknown option $1" >&2; usage ;;
        *) break ;;
    esac
done
[[ -n $head_endpoint && $head_endpoint == *:* ]] || { echo "--head HOST:PORT is required" >&2; usage; }
[[ -n $nnodes ]] || { echo "--nnodes is required" >&2; usage; }
[[ -n $run_id ]] || { echo "--run-id is required (the same on every node)" >&2; usage; }

ddp_pick_entry
nproc="${nproc:-$(ddp_default_nproc)}"
ddp_default_threads "$nproc"
export PYTHONUNBUFFERED=1

rank_args=()
[[ -n $node_rank ]] && rank_args=(--node-rank="$node_rank")

# Run from the caller's directory (relative overrides such as data.root keep
# their meaning); the module must still import from the repository.
export PYTHONPATH="$DDP_ROOT${PYTHONPATH:+:$PYTHONPATH}"
# shellcheck disable=SC2206  # TORCHRUN_ARGS is a user-given word list
cmd=("${TORCHRUN[@]}" --nnodes="$nnodes" --nproc-per-node="$nproc" "${rank_args[@]}"
    --rdzv-backend=c10d --rdzv-endpoint="$head_endpoint" --rdzv-id="$run_id"
    --max-restarts="$max_restarts" ${TORCHRUN_ARGS:-} "${TRAIN_ENTRY[@]}" "$@")
echo "[launch $(hostname -s)] ${cmd[*]}" >&2
exec "${cmd[@]}"
