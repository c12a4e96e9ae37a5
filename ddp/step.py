"""One optimizer update, one evaluation, and the per-epoch accounting.

- `Stepper`: the micro-batches of a step (DDP syncs gradients only on the last), then
  the update, or no update when the loss was not finite on some rank.
- `evaluate`: loss and accuracy over the whole validation set, reduced exactly.
- `epoch_metrics`: the epoch's train numbers from the sums the steps carried.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp.data.batch import Batch
from ddp.distributed import collectives
from ddp.distributed.group import DistEnv
from ddp.distributed.step_sums import StepSums
from ddp.noise_meter import NoiseMeter
from ddp.state import EPOCH_SUMS, Position, Training

DEVICE_SUMS = ("loss", "correct", "count")
HOST_SUMS = ("skipped", "preempt", "interrupt", "save", "failed")


@dataclass(frozen=True)
class StepTotals:
    """A step's numbers summed over all ranks (the same on every rank)."""

    step: int
    """The step's index in its epoch."""
    lr: float
    micro_batches: int
    """This rank's micro-batches in the step (its accumulation)."""
    loss: float
    """Sum of the per-sample losses: NaN or inf if any rank's loss was."""
    correct: float
    count: float
    """Valid samples (padding and skipped bad samples excluded)."""
    skipped: float
    """Bad samples skipped (data.loader.on_error=skip)."""
    preempt: float
    """> 0: some rank was asked to stop (SIGTERM / SIGUSR1)."""
    interrupt: float
    """> 0: some rank was interrupted (SIGINT, Ctrl-C)."""
    save: float
    """> 0: some rank found a checkpoint due."""
    failed: float
    """> 0: some rank could not write (a full disk): metrics or a checkpoint."""

    @property
    def finite(self) -> bool:
        """Whether the update was applied (it is not when the loss was not finite)."""
        return math.isfinite(self.loss)

    @property
    def mean_loss(self) -> float:
        return self.loss / max(self.count, 1)

    def epoch_sums(self) -> dict[str, float]:
        """What this step adds to the epoch's sums (a skipped update adds no loss)."""
        counted = EPOCH_SUMS if self.finite else ("skipped",)
        return {key: getattr(self, key) for key in counted}


class Stepper:
    """Forward/backward over a step's micro-batches, then the update.

    Padding repeats and skipped bad samples (valid=False) add nothing to the gradient,
    so each sample counts once per epoch. This rank's [loss sum, correct, samples] go
    to the step sums before the last backward, whose gradient all-reduce sums them over
    the ranks along with the host flags (no collective of its own).

    A loss that is not finite on any rank skips the update. With a fused optimizer (the
    default AdamW and SGD configs) and no fp16 grad scaler, the skip happens on the
    device, as GradScaler's does (`found_inf`), and the host need not wait for the
    step: it reads a step's totals `lag` steps later (1 on a GPU: the next step is
    already queued, so the GPU never idles on the host), from pinned memory the step
    copied them to. Otherwise (lag 0) the host reads them at once and decides.
    """

    def __init__(
        self,
        training: Training,
        env: DistEnv,
        autocast: Callable[[], object],
        grad_clip: float | None,
        lag: int = 0,
        noise: NoiseMeter | None = None,
    ) -> None:
        self.training, self.autocast, self.grad_clip = training, autocast, grad_clip
        self.sums = StepSums(env, training.ddp_model, DEVICE_SUMS, HOST_SUMS)
        self.noise = noise
        """The noise scale's meter: fed by the hook (world > 1) or by each micro-batch."""
        if noise is not None and env.distributed:
            self.sums.track_norms()
        self._accumulated: list[torch.Tensor] | None = None
        """One process: the gradients accumulated before this micro-batch (a copy)."""
        self._micro_norms = torch.zeros(2, dtype=torch.float64, device=env.device)
        """One process: [mean of the step's micro-batch |g|², the step's |g|²]."""
        self.device_skip = skips_on_device(training)
        if lag and not self.device_skip:
            raise ValueError("reading a step's totals late needs a fused optimizer, no fp16")
        self.lag = lag
        cuda = env.device.type == "cuda"
        self._staging = [torch.zeros(len(self.sums.keys), pin_memory=cuda) for _ in range(lag + 1)]
        self._turn = 0
        self._pending: deque[tuple[dict, torch.Tensor, torch.cuda.Event | None]] = deque()
        self._stats: list[torch.Tensor] = []
        self._step, self._lr = 0, 0.0

    @property
    def in_flight(self) -> int:
        """Steps queued whose totals have not been read yet."""
        return len(self._pending)

    def begin(self, step: int, lr: float, **host_values: float) -> None:
        for group in self.training.optimizer.param_groups:
            group["lr"] = lr
        self.sums.set_host(**host_values)
        self._stats = []
        self._step, self._lr = step, lr

    def forward_backward(self, batch: Batch, accumulate: int, last: bool) -> None:
        """One micro-batch: its share (1 / accumulate) of the rank's gradient."""
        ddp_model = self.training.ddp_model
        sync = nullcontext() if last or not isinstance(ddp_model, DDP) else ddp_model.no_sync()
        with sync:
            with self.autocast():
                logits = ddp_model(batch.inputs)
            losses = F.cross_entropy(logits.float(), batch.targets, reduction="none")
            loss = (losses * batch.valid).sum()
            with torch.no_grad():
                hits = (logits.argmax(dim=1) == batch.targets).logical_and_(batch.valid)
                self._stats.append(torch.stack([loss, hits.sum(), batch.valid.sum()]))
                if last:
                    self.sums.set_device(torch.stack(self._stats).sum(dim=0))
            # Sum over the micro-batch / its size / accumulate: this rank's share of the mean
            # over the global batch; DDP averages the ranks.
            self.training.scaler.scale(loss / (len(losses) * accumulate)).backward()
        if self.noise is not None and not self.sums.tracks_norms:
            self._measure_micro_batch(accumulate, last)

    def _measure_micro_batch(self, accumulate: int, last: bool) -> None:
        """One process: this micro-batch's gradient (what its backward added, times
        `accumulate`: the mean over its samples) is the small batch, the step's the big."""
        grads = [p.grad for p in self.training.model.parameters() if p.grad is not None]
        before = self._accumulated or [torch.zeros_like(g) for g in grads]
        added = [g - b for g, b in zip(grads, before, strict=True)]
        # |accumulate x added|², averaged over the step's `accumulate` micro-batches
        self._micro_norms[0] += _sq_norm(added).to(self._micro_norms.device) * accumulate
        self._accumulated = None if last else [g.clone() for g in grads]
        if last:
            self._micro_norms[1] += _sq_norm(grads).to(self._micro_norms.device)

    def finish(self) -> None:
        """Apply the step's update, unless its loss was not finite on some rank (then no
        rank applies it), and queue its totals for `results`."""
        reduced = self.sums.reduced()
        t = self.training
        if self.device_skip:
            self._clip()
            t.optimizer.found_inf = (~torch.isfinite(reduced[0])).float()  # read by the kernel
            t.optimizer.step()
            del t.optimizer.found_inf
        elif math.isfinite(reduced[0].item()):
            self._clip()
            t.scaler.step(t.optimizer)
            t.scaler.update()
        if self.noise is not None:
            self._book_noise(reduced)
        t.optimizer.zero_grad(set_to_none=True)
        staging = self._staging[self._turn]
        self._turn = (self._turn + 1) % len(self._staging)
        staging.copy_(reduced, non_blocking=True)
        event = None
        if reduced.is_cuda:
            event = torch.cuda.Event()
            event.record()
        meta = {"step": self._step, "lr": self._lr, "micro_batches": len(self._stats)}
        self._pending.append((meta, staging, event))

    def _book_noise(self, reduced: torch.Tensor) -> None:
        """Count the step's norms when its every sample was real and its loss finite."""
        norms = self.sums.sq_norms if self.sums.tracks_norms else self._micro_norms
        count = reduced[DEVICE_SUMS.index("count")]
        self.noise.book(norms, (count == self.noise.big) & torch.isfinite(reduced[0]))
        norms.zero_()

    def _clip(self) -> None:
        if self.grad_clip is not None:
            t = self.training
            t.scaler.unscale_(t.optimizer)
            torch.nn.utils.clip_grad_norm_(t.model.parameters(), self.grad_clip)

    def results(self, drain: bool = False) -> list[StepTotals]:
        """Totals of finished steps, oldest first: all but the last `lag` queued, or all."""
        keep = 0 if drain else self.lag
        done = []
        while len(self._pending) > keep:
            meta, staging, event = self._pending.popleft()
            if event is not None:
                event.synchronize()  # waits for that step only, not for the ones behind it
            values = dict(zip(self.sums.keys, staging.tolist(), strict=True))
            done.append(StepTotals(**meta, **values))
        return done


def _sq_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    return torch.nn.utils.get_total_norm(tensors, norm_type=2.0).to(torch.float64).square()


def skips_on_device(training: Training) -> bool:
    """Whether the optimizer can skip an update on the device (fused kernels take a
    `found_inf` flag, as GradScaler uses them), with no fp16 scaler in the way."""
    optimizer = training.optimizer
    fused = any(group.get("fused") for group in optimizer.param_groups)
    supports = getattr(optimizer, "_step_supports_amp_scaling", False)
    return bool(fused and supports and not training.scaler.is_enabled())


@torch.no_grad()
def evaluate(
    model, loader, env: DistEnv, autocast, move, num_classes: int | None = None
) -> dict[str, Any]:
    """Loss and accuracy over the whole split, reduced exactly across ranks (padding
    excluded); with `num_classes`, also the confusion matrix (rows: true class)."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss, correct, samples
    confusion = torch.zeros(
        num_classes or 0, num_classes or 0, dtype=torch.int64, device=env.device
    )
    for batch in loader:
        batch = move(batch)
        with autocast():
            logits = model(batch.inputs)
        valid = batch.valid  # masks, not boolean indexing: no host sync per batch
        losses = F.cross_entropy(logits.float(), batch.targets, reduction="none")
        predicted = logits.argmax(dim=1)
        sums[0] += torch.where(valid, losses, 0.0).sum().double()
        sums[1] += (predicted == batch.targets).logical_and_(valid).sum().double()
        sums[2] += valid.sum().double()
        if num_classes:
            cells = (batch.targets * num_classes + predicted) * valid + (~valid) * num_classes**2
            confusion += torch.bincount(cells, minlength=num_classes**2 + 1)[:-1].view_as(confusion)
    model.train()
    collectives.all_reduce_sum(sums, env)
    loss, correct, count = sums.tolist()
    metrics: dict[str, Any] = {
        "val/loss": loss / count,
        "val/accuracy": correct / count,
        "val/samples": count,
    }
    if num_classes:
        metrics["val/confusion"] = collectives.all_reduce_sum(confusion, env).cpu().tolist()
    return metrics


def epoch_metrics(pos: Position, samples_per_s: float) -> dict[str, float]:
    """Train loss and accuracy of the epoch over all ranks (its step sums already are),
    bad samples skipped, throughput."""
    loss, correct, count, skipped = (pos.epoch_sums.get(k, 0.0) for k in EPOCH_SUMS)
    return {
        "train/epoch_loss": loss / max(count, 1),
        "train/epoch_accuracy": correct / max(count, 1),
        "train/samples_per_s": samples_per_s,
        "data/skipped_samples": skipped,
    }
