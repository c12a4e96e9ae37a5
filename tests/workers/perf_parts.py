"""Parts a run plugs in by `_target_` for tests/test_perf.py and tests/test_cuda.py (the
trainer's processes import them: the repository root is on their PYTHONPATH).

- `Sleep`: a data.transform that takes `seconds` per sample, so a run waits for data.
- `Uncalibrated`: an MLP that refuses to predict (eval mode) before it has trained on a
  micro-batch, as a head calibrated by training would: the FLOP count, an eval-mode
  forward at start-up, cannot run it; training and its evaluations can.
- `Hungry`: an MLP that asks the GPU for far more memory than it has once it has trained
  `after` micro-batches: a real CUDA out-of-memory inside the training loop.
"""

from __future__ import annotations

import time

import torch

from ddp.models import MLP


class Sleep:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x


class Uncalibrated(MLP):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.trained = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and not self.trained:
            raise RuntimeError("Uncalibrated predicts only once training has calibrated it")
        self.trained = self.trained or self.training
        return super().forward(x)


class Hungry(MLP):
    def __init__(self, *args, after: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.after, self.seen = after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.is_cuda:
            self.seen += 1
            if self.seen > self.after:
                torch.empty(1 << 50, dtype=torch.uint8, device=x.device)  # 1 PiB
        return super().forward(x)
