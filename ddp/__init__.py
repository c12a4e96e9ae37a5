"""ddp: data-parallel training over sharded WebDataset data, driven by Hydra."""

__version__ = "0.1.0"
