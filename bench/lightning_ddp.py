"""The same job with PyTorch Lightning's Trainer (strategy="ddp"), as a user would write it.

    torchrun --standalone --nproc_per_node=2 bench/lightning_ddp.py --data data/digits \
        --model mlp --global-size 64 --micro-size 16 --epochs 5 --run-dir /tmp/pl

Launched by torchrun like the others (Lightning detects torchelastic and does not
spawn). Data: the in-memory samples in a DataLoader, Lightning's automatic
DistributedSampler, `accumulate_grad_batches`, `gradient_clip_val`. Defaults kept
where a user would keep them: checkpointing each epoch (ModelCheckpoint), the
default logger (CSV here, TensorBoard if installed), the sanity validation, `self.log`
with `sync_dist=True` for validation. Progress bar and model summary off (console
noise only). Rank 0 prints one `BENCH_RESULT {json}` line.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead_common as common  # noqa: E402

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name
    import pytorch_lightning as pl


class Classifier(pl.LightningModule):
    def __init__(self, model: torch.nn.Module, total_steps: int):
        super().__init__()
        self.model, self.total_steps = model, total_steps

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val/accuracy", (logits.argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=common.LR, betas=common.BETAS, weight_decay=common.WEIGHT_DECAY
        )
        # LambdaLR multiplies the base lr: divide lr_at by it.
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: common.lr_at(step, self.total_steps) / common.LR
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class Clock(pl.Callback):
    """The same marks the other programs print: first optimizer step, per-epoch train
    loop time, end of each epoch's validation."""

    def __init__(self, device: torch.device):
        self.device = device
        self.first_step_time = None
        self.epoch_end_times: list[float] = []
        self.train_seconds: list[float] = []
        self._t0 = 0.0
        self._last_batch_end = 0.0

    def on_train_epoch_start(self, trainer, module):
        common.sync(self.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.first_step_time is None and trainer.global_step >= 1:
            common.sync(self.device)
            self.first_step_time = common.now()
        self._last_batch_end = time.perf_counter()

    def on_validation_epoch_end(self, trainer, module):
        if trainer.sanity_checking:
            return
        common.sync(self.device)
        self.train_seconds.append(self._last_batch_end - self._t0)
        self.epoch_end_times.append(common.now())


def main() -> None:
    args = common.job_args(__doc__.splitlines()[0])
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    cuda = torch.cuda.is_available()
    device = common.device_for(int(os.environ.get("LOCAL_RANK", 0)))
    pl.seed_everything(args.seed, verbose=False)

    train_x, train_y = common.load_split(f"{args.data}/train")
    val_x, val_y = common.load_split(f"{args.data}/val")
    accumulate = args.global_size // (args.micro_size * world)
    steps = common.iterations_per_epoch(len(train_y), args.global_size)
    train = common.Wrapped(train_x, train_y, steps * args.global_size)
    val = torch.utils.data.TensorDataset(val_x, val_y)
    loader = torch.utils.data.DataLoader(train, batch_size=args.micro_size, shuffle=True)
    val_loader = torch.utils.data.DataLoader(val, batch_size=args.micro_size)

    model = common.build_model(args, in_features=train_x[0].numel())
    module = Classifier(model, total_steps=steps * args.epochs)
    clock = Clock(device)
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=local_world,
        num_nodes=world // local_world,
        strategy="ddp" if world > 1 else "auto",
        max_epochs=args.epochs,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=common.GRAD_CLIP,
        default_root_dir=args.run_dir,
        callbacks=[clock],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader, val_loader)
    if trainer.global_rank == 0:
        common.emit(
            {
                "program": "lightning",
                "world_size": world,
                "device": device.type,
                "steps_per_epoch": trainer.global_step // args.epochs,
                "samples_per_epoch": steps * args.global_size,
                "first_step_time": clock.first_step_time,
                "epoch_end_times": clock.epoch_end_times,
                "train_seconds": clock.train_seconds,
            }
        )
    common.exit_now(0)


if __name__ == "__main__":
    main()
