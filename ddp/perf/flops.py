"""How close a run is to the hardware: the model's FLOPs per sample, achieved TFLOPS, MFU.

The FLOPs are counted once, at start-up, by `torch.utils.flop_counter.FlopCounterMode`
over one forward of the run's model on its first micro-batch, in eval mode without
gradients (nothing of the run changes; a few ms: on the meta device the first forward
alone took 2.2 s, torch loading its meta kernels). Training costs three
forwards: the backward twice the forward (the gradients of the inputs and of the
weights), the convention of model FLOPs utilization (PaLM's MFU: the first layer's
input gradient, which autograd skips, is counted too, so every model is judged alike).

MFU = the achieved TFLOPS per device / the device's peak dense TFLOPS at the run's
precision (`PEAK_TFLOPS`, from NVIDIA's datasheets; `trainer.peak_tflops` for others).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

PEAK_TFLOPS: dict[str, dict[str, float]] = {
    # dense tensor-core TFLOPS (without 2:4 sparsity); fp32: the CUDA cores
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
}
"""Peak dense TFLOPS by device (matched in order against torch's device name) and
precision: bf16/fp16 with fp32 accumulation, tf32 (fp32 matmuls when torch allows
TF32), fp32."""


def count_flops_per_sample(model: torch.nn.Module, inputs: torch.Tensor) -> float:
    """Training FLOPs per sample (forward + backward = 3 forwards) of `model` on `inputs`
    (a micro-batch as the model sees it): one forward in eval mode without gradients.
    Every module's mode, the weights, the buffers (eval mode updates no running
    statistics) and the random state are as they were. Raises what the forward raises
    (a model whose forward needs gradients, say)."""
    modes = {module: module.training for module in model.modules()}
    devices = [inputs.device.index or 0] if inputs.is_cuda else []
    counter = FlopCounterMode(display=False)
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), counter:
            model.eval()
            model(inputs)
    finally:
        for module, training in modes.items():
            module.training = training
    return 3.0 * counter.get_total_flops() / len(inputs)


def matmul_precision(precision: str) -> str:
    """The peak table's column for trainer.precision: fp32 runs its matmuls in TF32 where
    torch allows it (torch.set_float32_matmul_precision("high") or allow_tf32)."""
    if precision != "fp32":
        return precision
    tf32 = (
        torch.get_float32_matmul_precision() != "highest" or torch.backends.cuda.matmul.allow_tf32
    )
    return "tf32" if tf32 else "fp32"


def peak_tflops(device: torch.device, precision: str) -> tuple[float | None, str]:
    """The device's peak for the run's precision, and its name (None: not in the table)."""
    if device.type != "cuda":
        return None, device.type
    name = torch.cuda.get_device_name(device)
    column = matmul_precision(precision)
    for model, peaks in PEAK_TFLOPS.items():
        if model in name:
            return peaks[column], f"{name} at {column}"
    return None, f"{name} at {column}"


def perf_metrics(
    flops_per_sample: float | None, samples_per_s: float, world_size: int, peak: float | None
) -> dict[str, float]:
    """perf/tflops (achieved, per process) and perf/mfu (with a peak) for an epoch."""
    if flops_per_sample is None:
        return {}
    tflops = flops_per_sample * samples_per_s / world_size / 1e12
    metrics = {"perf/tflops": tflops}
    if peak:
        metrics["perf/mfu"] = tflops / peak
    return metrics
