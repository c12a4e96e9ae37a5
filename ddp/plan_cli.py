"""`ddp-plan`: print the batch plan of a config without data, GPUs or a process group.

    ddp-plan experiment=digits world_size=8
    ddp-plan batch.global_size=100 batch.micro_size=10 world_size=2 num_samples=1000 --json
    ddp-plan run=runs/digits world_size=8    # which global batch: the run's noise scale

Arithmetic on a config and a manifest: no torch import (it starts in a fraction of
the trainer's time).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from ddp.compose import compose
from ddp.config_moves import moved_key_hint
from ddp.data.splits import train_samples
from ddp.distributed.env import detect
from ddp.distributed.exit import ExitCode
from ddp.errors import BadInput, ConfigError
from ddp.noise_scale import advice
from ddp.plan import plan_for
from ddp.tracking.metrics_file import METRICS_FILE, read_records

USAGE = (
    "usage: ddp-plan [--json] [world_size=N] [num_samples=N] [hydra overrides ...]\n"
    "       ddp-plan run=RUN_DIR [world_size=N]"
)


def parse(argv: list[str]) -> tuple[bool, int | None, int | None, list[str], str | None]:
    as_json, world_size, num_samples, overrides, run = False, None, None, [], None
    for arg in argv:
        key, _, value = arg.partition("=")
        if arg == "--json":
            as_json = True
        elif key == "run":
            run = value
        elif arg in ("-h", "--help"):
            print(USAGE)
            sys.exit(0)
        elif key in ("world_size", "num_samples"):
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"{key}={value!r} must be a positive integer")
            if key == "world_size":
                world_size = int(value)
            else:
                num_samples = int(value)
        else:
            overrides.append(arg)
    return as_json, world_size, num_samples, overrides, run


def run_advice(run_dir: Path, world_size: int | None) -> str:
    """The noise scale a finished (or running) run measured, and the global batches it
    recommends; ConfigError naming the run when it measured none."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ConfigError(f"run={run_dir}: no {METRICS_FILE} there (is it a run directory?)")
    records = read_records(path)
    plan = next((r for r in records if r.get("kind") == "plan"), None)
    measured = [
        r
        for r in records
        if r.get("kind") == "val" and isinstance(r.get("batch/noise_scale"), (int, float))
    ]
    if plan is None or not measured:
        raise ConfigError(
            f"run={run_dir}: no noise scale measured yet (it needs a finished epoch, "
            "trainer.noise_scale=true, and 2 processes or accumulation)"
        )
    last = measured[-1]
    return advice(
        last["batch/noise_scale"],
        last["epoch"],
        plan["num_samples"],
        plan["global_size"],
        plan["micro_size"],
        world_size or plan["world_size"],
        plan["drop_last"],
    )


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(int(ExitCode.BAD_INPUT))


def main(argv: list[str] | None = None) -> None:
    try:
        as_json, world_size, num_samples, overrides, run = parse(
            sys.argv[1:] if argv is None else argv
        )
        if run is not None:
            print(run_advice(Path(run), world_size))
            return
        config = compose(overrides)
        if num_samples is None:
            num_samples = train_samples(config.data)  # the trainer's own lookup
        plan = plan_for(config.batch, world_size or detect().world_size, num_samples)
    except BadInput as exc:
        fail(str(exc))
    except (HydraException, OmegaConfBaseException) as exc:
        fail(moved_key_hint(str(exc).strip().splitlines()[0]))
    print(json.dumps(plan.as_dict(), indent=2) if as_json else plan.table())


if __name__ == "__main__":
    main()
