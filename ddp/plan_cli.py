"""`ddp-plan`: print the batch plan of a config without data, GPUs or a process group.

    ddp-plan experiment=digits world_size=8
    ddp-plan batch.global_size=100 batch.micro_size=10 world_size=2 num_samples=1000 --json

Arithmetic on a config and a manifest: no torch import (it starts in a fraction of
the trainer's time).
"""

from __future__ import annotations

import json
import sys

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from ddp.compose import compose
from ddp.config import moved_key_hint
from ddp.data.splits import train_samples
from ddp.dist.env import detect
from ddp.dist.exit import ExitCode
from ddp.plan import PlanError, plan_for
from ddp.shards.manifest import DataError
from ddp.validate import ConfigError

USAGE = "usage: ddp-plan [--json] [world_size=N] [num_samples=N] [hydra overrides ...]"


def parse(argv: list[str]) -> tuple[bool, int | None, int | None, list[str]]:
    as_json, world_size, num_samples, overrides = False, None, None, []
    for arg in argv:
        key, _, value = arg.partition("=")
        if arg == "--json":
            as_json = True
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
    return as_json, world_size, num_samples, overrides


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(int(ExitCode.BAD_INPUT))


def main(argv: list[str] | None = None) -> None:
    try:
        as_json, world_size, num_samples, overrides = parse(sys.argv[1:] if argv is None else argv)
        config = compose(overrides)
        if num_samples is None:
            num_samples = train_samples(config.data)  # the trainer's own lookup
        plan = plan_for(config.batch, world_size or detect().world_size, num_samples)
    except (ConfigError, PlanError, DataError) as exc:
        fail(str(exc))
    except (HydraException, OmegaConfBaseException) as exc:
        fail(moved_key_hint(str(exc).strip().splitlines()[0]))
    print(json.dumps(plan.as_dict(), indent=2) if as_json else plan.table())


if __name__ == "__main__":
    main()
