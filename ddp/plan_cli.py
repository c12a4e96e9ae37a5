"""`ddp-plan`: print the batch plan of a config without data, GPUs or a process group.

ddp-plan experiment=digits world_size=8
ddp-plan batch.global_size=100 batch.micro_size=10 world_size=2 num_samples=1000 --json
"""

from __future__ import annotations

import json
import sys

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from ddp import data, dist
from ddp.config import CONF_DIR, ConfigError, register, to_config
from ddp.plan import PlanError, plan_for

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
            if not value.isdigit():
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
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    try:
        as_json, world_size, num_samples, overrides = parse(sys.argv[1:] if argv is None else argv)
        register()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            config = to_config(compose("config", overrides=overrides))
        if num_samples is None:
            from ddp.train import train_samples  # the trainer's own lookup

            num_samples = train_samples(config)
        plan = plan_for(config.batch, world_size or dist.world_size_from_env(), num_samples)
    except (ConfigError, PlanError, data.DataError) as exc:
        fail(str(exc))
    except (HydraException, OmegaConfBaseException) as exc:
        fail(str(exc).strip().splitlines()[0])
    print(json.dumps(plan.as_dict(), indent=2) if as_json else plan.table())


if __name__ == "__main__":
    main()
