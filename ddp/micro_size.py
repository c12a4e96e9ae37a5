"""`batch.micro_size=auto`: the largest micro-batch whose step fits in the GPU's memory.

What fits is found by real trial steps (forward, backward, optimizer step) of the model
and optimizer the run builds, on copies of one real training sample, from the largest
micro-batch the plan allows (global_size / world_size) down through its divisors: an
out-of-memory is caught and the next smaller size tried, and a size that runs but
peaks above SAFETY of the device's memory counts as not fitting (headroom for the
allocator's fragmentation, the prefetched next batch, evaluation). The ranks agree on the
smallest of their answers through torchrun's store, before any process group exists.
Accumulation then follows from the global batch, as for a micro-batch given by hand.

On a CPU it is refused: there is no memory ceiling to find, and a host's swap would
make every trial "fit".
"""

from __future__ import annotations

import datetime as dt
import gc
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

from ddp.config import Config
from ddp.distributed.env import Launch
from ddp.distributed.store import agent_store
from ddp.errors import ConfigError

AUTO = "auto"
SAFETY = 0.85
"""The share of the device's memory a trial step may peak at."""


def candidates(global_size: int, world_size: int) -> list[int]:
    """Micro-batch sizes to try, largest first: the divisors of global_size / world_size
    (each keeps the global batch a multiple of micro_size x world_size)."""
    if global_size % world_size:
        raise ConfigError(
            f"batch.global_size={global_size} is not a multiple of world_size={world_size}: "
            "batch.micro_size=auto needs one"
        )
    per_rank = global_size // world_size
    return [m for m in range(per_rank, 0, -1) if per_rank % m == 0]


def largest_that_fits(sizes: list[int], fits: Callable[[int], bool]) -> int | None:
    """The first of `sizes` (largest first) for which `fits` holds; None if none does."""
    for size in sizes:
        if fits(size):
            return size
    return None


def check_auto(config: Config, device: torch.device) -> bool:
    """Whether the micro-batch is to be found; ConfigError where it cannot be (a CPU)."""
    if config.batch.micro_size != AUTO:
        return False
    if device.type != "cuda":
        raise ConfigError(
            "batch.micro_size=auto needs a CUDA GPU (it finds the largest micro-batch whose "
            f"step fits in GPU memory); on {device.type} give a number, e.g. batch.micro_size=32"
        )
    return True


def find_micro_size(
    config: Config,
    launch: Launch,
    device: torch.device,
    sample: tuple[torch.Tensor, torch.Tensor],
    build: Callable[[int], tuple[torch.nn.Module, torch.optim.Optimizer]],
    autocast: Callable[[], object],
) -> tuple[Config, str]:
    """`config` with batch.micro_size set to what fits on every rank, and the line that
    says so. `sample` is one training sample's (model input, target) on the device, as the
    input pipeline makes it; `build(micro_size)` a fresh model and optimizer as the run
    builds them."""
    sizes = candidates(config.batch.global_size, launch.world_size)
    total = torch.cuda.get_device_properties(device).total_memory
    peaks: dict[int, float | None] = {}

    def fits(size: int) -> bool:
        peaks[size] = trial_step(size, sample, build, autocast, device)
        return peaks[size] is not None and peaks[size] <= SAFETY * total

    mine = largest_that_fits(sizes, fits)
    if mine is None:
        raise ConfigError(
            f"batch.micro_size=auto: not even a micro-batch of {sizes[-1]} fits in "
            f"{total / 2**30:.1f} GiB on {device}: a smaller model or trainer.precision=bf16"
        )
    agreed = smallest_over_ranks(mine, launch)
    tried = ", ".join(
        f"{s}: {'out of memory' if p is None else f'{p / 2**30:.1f} GiB'}"
        for s, p in sorted(peaks.items(), reverse=True)
    )
    line = (
        f"batch.micro_size=auto: {agreed} (a step's peak of {SAFETY:.0%} of "
        f"{total / 2**30:.1f} GiB at most; tried {tried}"
        + (f"; {mine} here, {agreed} on another rank" if agreed != mine else "")
        + ")"
    )
    return replace(config, batch=replace(config.batch, micro_size=agreed)), line


def trial_step(
    size: int,
    sample: tuple[torch.Tensor, torch.Tensor],
    build: Callable[[int], tuple[torch.nn.Module, torch.optim.Optimizer]],
    autocast: Callable[[], object],
    device: torch.device,
) -> float | None:
    """The peak memory (bytes) of one real step at `size` samples; None on out-of-memory.
    Everything it allocated is freed before it returns."""
    inputs, target = sample
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    model = optimizer = None
    try:
        model, optimizer = build(size)
        x = inputs.expand(size, *inputs.shape[1:]).contiguous()
        y = target.expand(size).contiguous()
        with autocast():
            logits = model(x)
        F.cross_entropy(logits.float(), y).backward()
        optimizer.step()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device))
    except torch.OutOfMemoryError:
        return None
    finally:
        del model, optimizer
        gc.collect()
        torch.cuda.empty_cache()


def smallest_over_ranks(value: int, launch: Launch, timeout_s: float = 600.0) -> int:
    """The smallest of every rank's `value`, through torchrun's store (no process group
    exists yet); `value` itself on one process. ConfigError where ranks cannot meet."""
    if launch.world_size == 1:
        return value
    store = agent_store(dt.timedelta(seconds=timeout_s))
    if store is None:
        raise ConfigError(
            "batch.micro_size=auto with several processes needs torchrun (its store lets "
            "the ranks agree before the process group); give a number instead"
        )
    prefix = f"ddp/micro_size/attempt_{launch.restart_count}"
    store.set(f"{prefix}/{launch.rank}", str(value))
    keys = [f"{prefix}/{rank}" for rank in range(launch.world_size)]
    store.wait(keys)
    return min(int(store.get(key)) for key in keys)
