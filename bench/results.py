"""Where a benchmark's figures go: bench/results/NAME-YYYY-MM-DD.json (committed), holding
the machine, the command line and the date beside the numbers, so that every figure the
README quotes can be traced to the run that gave it. `--json PATH` puts it elsewhere.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent


def default_path(name: str) -> Path:
    """bench/results/NAME-YYYY-MM-DD.json, today's (UTC) date."""
    return RESULTS / f"{name}-{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}.json"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The CPU (model, cores, cores this process may use), the load, torch and the GPUs."""
    import torch

    cuda = torch.cuda.is_available()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
        "platform": platform.platform(),
    }


def command() -> str:
    """This process's command line, as typed from the repository root."""
    argv = list(sys.argv)
    script = Path(argv[0]).resolve()
    if script.is_relative_to(ROOT):
        argv[0] = str(script.relative_to(ROOT))
    threads = os.environ.get("OMP_NUM_THREADS")
    return (f"OMP_NUM_THREADS={threads} " if threads else "") + shlex.join(["python", *argv])


def write(name: str, numbers: dict, path: Path | None = None) -> Path:
    """Write `numbers` with the machine, the command line and the date; say where. A
    "machine" dict in `numbers` (e.g. the device a bench ran on) adds to the machine's."""
    path = path or default_path(name)
    now = datetime.datetime.now(datetime.timezone.utc)
    numbers = dict(numbers)
    record = {
        "bench": name,
        "date": now.isoformat(timespec="seconds"),
        "command": command(),
        "machine": {**machine(), **numbers.pop("machine", {})},
        **numbers,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"results: {path}")
    return path
