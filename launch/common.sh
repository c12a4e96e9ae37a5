# Shared by launch/*.sh and slurm/train.sbatch (sourced, not run).
#
# Picks the Python that has torch and the trainer's command line, so every
# launcher starts the same thing the same way:
#   DDP_PYTHON       interpreter (default: python on PATH if it imports torch,
#                    else the repository's .venv)
#   TORCHRUN         array: "$DDP_PYTHON -m ddp.launch", torchrun itself but ending with
#                    the workers' exit code (2 bad input, 3 non-finite, 75 preempted,
#                    130 interrupted), and the same interpreter as the workers
#   TRAIN_ENTRY      array: what torchrun starts on every worker (-m ddp.train)
# shellcheck shell=bash disable=SC2034  # the arrays are used by the sourcing scripts

DDP_ROOT="${DDP_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"

ddp_pick_python() {
    if [[ -n ${DDP_PYTHON:-} ]]; then
        return
    fi
    if command -v python >/dev/null && python -c 'import torch' 2>/dev/null; then
        DDP_PYTHON=$(command -v python)
    elif [[ -x $DDP_ROOT/.venv/bin/python ]]; then
        DDP_PYTHON=$DDP_ROOT/.venv/bin/python
    else
        echo "error: no python with torch on PATH and no $DDP_ROOT/.venv; set DDP_PYTHON" >&2
        return 1
    fi
}

ddp_pick_entry() {
    ddp_pick_python
    TORCHRUN=("$DDP_PYTHON" -m ddp.launch)
    # `-m ddp.train` is what the `ddp-train` console script runs, with the same
    # interpreter as torchrun and no dependence on PATH or on an install
    # (PYTHONPATH below makes the repository importable).
    TRAIN_ENTRY=(-m ddp.train)
}

# Processes per node: the visible GPUs, else NPROC_CPU_DEFAULT CPU processes.
ddp_default_nproc() {
    local n=0
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} && ${CUDA_VISIBLE_DEVICES} != "-1" ]]; then
        n=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
    elif command -v nvidia-smi >/dev/null; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    if ((n > 0)); then
        echo "$n"
    else
        echo "${NPROC_CPU_DEFAULT:-2}"
    fi
}

# A free TCP port on this host (for rendezvous endpoints in tests and local runs).
ddp_free_port() {
    "$DDP_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

# Keep CPU workers from oversubscribing the cores: threads = cores / processes.
ddp_default_threads() {
    local nproc=$1 cores
    cores=${SLURM_CPUS_PER_TASK:-$(nproc)}
    if [[ -z ${OMP_NUM_THREADS:-} ]]; then
        OMP_NUM_THREADS=$((cores / nproc > 0 ? cores / nproc : 1))
        export OMP_NUM_THREADS
    fi
}
