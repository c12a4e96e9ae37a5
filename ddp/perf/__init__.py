"""Where the time goes, on every run (docs/performance.md).

- `timing`: each step's parts (data, compute, comm, optimizer) and the rest (other);
- `flops`: the model's FLOPs per sample, achieved TFLOPS and MFU;
- `trace`: torch.profiler traces of a window of steps (trainer.profile);
- `memory`: the peak per epoch, and what a CUDA out-of-memory leaves behind;
- `watch`: the loop's one handle on all of them.
"""
