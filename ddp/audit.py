"""The sample audit: proof, on the real run, that an epoch used every sample once.

`SampleAudit` counts how often each training sample was used this epoch over all ranks
(trainer.audit_samples); a checkpoint carries the unfinished epoch's counts.
"""

from __future__ import annotations

import torch

from ddp.data.batch import Batch
from ddp.distributed import collectives
from ddp.distributed.group import DistEnv


class SampleAudit:
    """Counts how often each training sample was used this epoch, over all ranks.

    Opt-in (trainer.audit_samples): one all_reduce of N counters per epoch proves
    the epoch guarantee on the real run: every sample once, plus the padding. A
    checkpoint carries the unfinished epoch's counts (8 bytes a sample, one more
    all_reduce per save), so the claim stays exact for an epoch that was resumed,
    whatever the world size after the resume.
    """

    def __init__(self, num_samples: int) -> None:
        self.counts = torch.zeros(num_samples, dtype=torch.int64)

    def state(self, env: DistEnv) -> torch.Tensor | None:
        """The epoch's counts so far over all ranks (every rank calls it), for a checkpoint."""
        if not len(self.counts):
            return None
        return collectives.all_reduce_sum(self.counts.to(env.device, copy=True), env).cpu()

    def resume(self, state: dict | None, env: DistEnv) -> None:
        """Continue the counts of the checkpoint's unfinished epoch (held by rank 0 alone,
        since they are summed over ranks). A checkpoint without them (auditing was off),
        or of a restarted epoch, leaves the counts at zero."""
        saved = state.get("audit") if state else None
        mid_epoch = state is not None and state["position"]["step_in_epoch"] > 0
        if saved is not None and mid_epoch and len(saved) == len(self.counts) and env.is_main:
            self.counts.copy_(saved)

    def record(self, batches: list[Batch]) -> None:
        if len(self.counts):
            for batch in batches:  # the indices stay on the host: no device sync
                self.counts.index_add_(0, batch.indices, torch.ones_like(batch.indices))

    def finish_epoch(self, env: DistEnv) -> dict[str, float]:
        if not len(self.counts):
            return {}
        counts = collectives.all_reduce_sum(self.counts.to(env.device, copy=True), env).cpu()
        self.counts.zero_()
        used = int((counts > 0).sum())
        return {
            "audit/unique_samples": used,
            "audit/missing_samples": len(counts) - used,
            "audit/repeated_samples": int(counts.sum()) - used,
        }
