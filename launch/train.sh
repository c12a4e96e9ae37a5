#!/usr/bin/env bash
# `make train`, ending with the trainer's exit code: set up what make sets up (.venv,
# the digits shards), then train the default experiment on this machine
# (launch/local.sh experiment=digits) in runs/digits; running it again continues it.
#
#   launch/train.sh                          # all visible GPUs, or 2 CPU processes
#   launch/train.sh trainer.max_epochs=5     # Hydra overrides (make train's ARGS)
#   NPROC=1 launch/train.sh
#
# Exit: 0 done, 2 bad input, 3 non-finite loss, 4 a peer was lost, 75 preempted and
# 130 interrupted (run it again to continue), 128+N a process killed by signal N, 1 a
# bug. `make train` runs this script, but GNU make ends every failed recipe with its
# own status 2 (`make: *** [Makefile:NN: train] Error 75`): where the code matters
# (a requeue loop, CI), run this script instead.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" # where make train runs: data/digits and runs/digits are relative to it

make --no-print-directory --silent data # up to date in a few ms (and under make train)
export DDP_PYTHON="${DDP_PYTHON:-$root/.venv/bin/python}"
exec launch/local.sh experiment=digits "$@"
