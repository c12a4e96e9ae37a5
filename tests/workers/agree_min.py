"""Each rank offers a micro-batch size (16 on rank 0, 8 on the others) to
ddp.micro_size.smallest_over_ranks, before any process group, and prints what was agreed
(run under torchrun by tests/test_micro_size.py)."""

from __future__ import annotations

from ddp.distributed.env import detect
from ddp.micro_size import smallest_over_ranks

launch = detect()
mine = 16 if launch.rank == 0 else 8
print(f"rank {launch.rank}: offered {mine}, agreed {smallest_over_ranks(mine, launch, 60)}")
