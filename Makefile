# Two commands do everything on a fresh machine:
#   make train   set up, make the digits shards, train the default experiment (2 processes)
#   make test    set up, make the digits shards, run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# The torch to install when the venv has none. Clusters: create $(VENV) with your
# own CUDA build first (or set TORCH=...); it is kept.
TORCH ?= torch==2.13.0
# Processes: one per visible GPU on a CUDA machine, else 2 CPU processes (launch/local.sh).
NPROC ?=
ARGS ?=
JOBS ?= 2
BIN := $(VENV)/bin
STAMP := $(VENV)/.ddp-installed

.PHONY: setup data train test test-packages lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e '.[test,slurm]'
	touch $@

data: setup
	test -f data/digits/train/manifest.json || $(BIN)/ddp-shards prepare digits --out data/digits

# Running it again continues the same run (runs/digits). GNU make exits 2 after any
# failed recipe, printing the trainer's code in its `Error N` line (0 done, 2 bad input,
# 3 non-finite, 4 peer lost, 75 preempted, 130 interrupted): launch/train.sh is the
# same command and exits with that code itself.
train: data
	DDP_PYTHON=$(BIN)/python NPROC=$(NPROC) launch/train.sh $(ARGS)

# DDP_TEST_SLURM=1: the SLURM tests may start the local one-node cluster (as root;
# slurm/cluster.sh installs Debian's packages); elsewhere they skip with the reason.
# DDP_TEST_HOSTS=1: the multi-host tests may build two namespace hosts (as root;
# slurm/hosts.sh) and their 2-node SLURM cluster, and remove them at the end.
# JOBS: pytest-xdist workers (0: one process); the SLURM and host tests share one worker.
# As root on Debian, nginx (for the remote-data tests) is installed if missing; without it
# those tests skip with the reason.
test: data test-packages
	OMP_NUM_THREADS=1 DDP_TEST_SLURM=$${DDP_TEST_SLURM:-1} DDP_TEST_HOSTS=$${DDP_TEST_HOSTS:-1} \
		$(BIN)/python -m pytest -q -n $(JOBS) --dist loadgroup $(ARGS)

test-packages:
	@if [ "$$(id -u)" = 0 ] && ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ] \
		&& command -v apt-get >/dev/null; then \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends nginx-light) \
		|| echo "nginx not installed: the remote-data tests over nginx will skip"; fi

# Ours vs a raw DDP loop vs Lightning (installs the bench extra), then the data loader;
# each writes bench/results/NAME-DATE.json. Exit 1 if a goal (bench/goals.py) is missed.
bench: data
	$(BIN)/pip install --quiet -e '.[test,slurm,bench]'
	status=0; OMP_NUM_THREADS=1 $(BIN)/python bench/overhead.py --repeats 5 || status=$$?; \
		$(BIN)/python bench/data_bench.py || status=$$?; exit $$status

lint: setup
	$(BIN)/ruff check ddp tests bench && $(BIN)/ruff format --check ddp tests bench

clean:
	rm -rf $(VENV) runs outputs multirun
