#!/usr/bin/env bash
# One machine, N processes: torchrun --standalone (it picks a free rendezvous
# port, so several local runs can coexist).
#
#   launch/local.sh                      # all visible GPUs, or 2 CPU processes
#   launch/local.sh 4 trainer.max_epochs=3 run.name=try
#   NPROC=1 launch/local.sh experiment=digits
#
# The first argument is the process count when it is a number; everything else
# is passed to the trainer as Hydra overrides. Extra torchrun options go in
# TORCHRUN_ARGS (e.g. TORCHRUN_ARGS="--max-restarts=2").
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

nproc="${NPROC:-}"
if [[ ${1:-} =~ ^[0-9]+$ ]]; then
    nproc=$1
    shift
fi
ddp_pick_entry
nproc="${nproc:-$(ddp_default_nproc)}"
ddp_default_threads "$nproc"
export PYTHONUNBUFFERED=1

# Run from the caller's directory (relative overrides such as data.root keep
# their meaning); the module must still import from the repository.
export PYTHONPATH="$DDP_ROOT${PYTHONPATH:+:$PYTHONPATH}"
# shellcheck disable=SC2206  # TORCHRUN_ARGS is a user-given word list
cmd=("${TORCHRUN[@]}" --standalone --nnodes=1 --nproc-per-node="$nproc"
    ${TORCHRUN_ARGS:-} "${TRAIN_ENTRY[@]}" "$@")
echo "[launch] ${cmd[*]}" >&2
exec "${cmd[@]}"
