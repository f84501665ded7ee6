"""SAL pre-training as a Lightning ``LightningModule``, on slice pairs of the bundled sample scan.

    python examples/pretrain_sal_lightning.py        # python examples/pretrain_sal_lightning.py --smoke

DDP (``--devices N --strategy ddp``, or under torchrun): Lightning wraps the LightningModule in
``DistributedDataParallel``, so the criterion must live inside it (here: ``self.model``, a
``SALModel``), else each process's positional head trains on its own gradients (``SALoss`` warns);
``configure_optimizers`` takes ``self.parameters()``, which holds the head. Lightning adds a
``DistributedSampler`` and calls its ``set_epoch``; the dataset's own ``set_epoch`` (fresh pairs,
kept in shared memory, so persistent workers see it too) is called at the end of each epoch for the
next one: Lightning may start an epoch's iterator, whose workers prefetch, before ``on_train_epoch_start``.
"""

import argparse

import lightning as L
import torch
from monai.networks.nets import BasicUNet
from torch import nn
from torch.utils.data import DataLoader

from salign_kernels import SALModel, SALoss
from salign_kernels.data import SAMPLE_IMAGE, SlicePairDataset


class SALPretraining(L.LightningModule):
    """A BasicUNet's encoder (stride 4, 32 channels) with the SAL objective, all in ``self.model``."""

    def __init__(self, window: int = 3, lr: float = 1e-3):
        super().__init__()
        unet = BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=(8, 8, 16, 32, 64, 8))
        encoder = nn.Sequential(unet.conv_0, unet.down_1, unet.down_2, nn.Conv2d(16, 32, 1))
        self.model, self.lr = SALModel(encoder, SALoss(in_channels=32, window=window, symmetric=True)), lr

    def training_step(self, batch, batch_idx):
        out = self.model(batch["slice_a"], batch["slice_b"], batch["pos_a"], batch["pos_b"],
                         batch.get("mask_a"), batch.get("mask_b"))
        self.log_dict(out._asdict(), batch_size=len(batch["slice_a"]), sync_dist=True)
        return out.total

    def on_train_epoch_end(self):
        self.trainer.train_dataloader.dataset.set_epoch(self.current_epoch + 1)  # before its iterator starts
        parts = {k: f"{float(v):.4f}" for k, v in self.trainer.callback_metrics.items()}  # means over ranks
        if self.trainer.is_global_zero:
            print(f"epoch {self.current_epoch}: {parts}")

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)  # encoder and positional head


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--smoke", action="store_true", help="a few-second run: 2 steps of tiny slices")
    args = parser.parse_args(argv)
    size, epochs, pairs = (32, 1, 4) if args.smoke else (args.size, args.epochs, None)
    dataset = SlicePairDataset(SAMPLE_IMAGE, size=size, foreground_threshold=0.05, pairs_per_volume=pairs)
    loader = DataLoader(dataset, batch_size=2 if args.smoke else 8, shuffle=True, num_workers=0)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=args.devices, strategy=args.strategy,
                        logger=False, enable_checkpointing=False, enable_progress_bar=not args.smoke)
    trainer.fit(SALPretraining(), loader)


if __name__ == "__main__":
    main()
