"""Per-sample transforms, plugged in with `data.transform._target_` (any callable works)."""

from __future__ import annotations

import torch


class Normalize:
    """(x - mean) / std, channel-wise when given sequences."""

    def __init__(self, mean: float | list[float], std: float | list[float]) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class RandomShift:
    """Shift a CHW image by up to `pixels` in each direction, zero-filled (augmentation)."""

    def __init__(self, pixels: int = 1) -> None:
        self.pixels = pixels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pixels
        dy, dx = torch.randint(-p, p + 1, (2,)).tolist()
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        h, w = x.shape[-2:]
        return padded[..., p + dy : p + dy + h, p + dx : p + dx + w]
