"""SAL pre-training in a MONAI ``SupervisedTrainer``, on slice pairs of the bundled sample scan.

    python examples/pretrain_sal_monai.py            # python examples/pretrain_sal_monai.py --smoke

The network is a ``SALModel`` (encoder + ``SALoss``), ``SALPrepareBatch`` feeds it the pair and
``sal_total`` gives the engine the loss to backpropagate; the parts stay in
``engine.state.output["pred"]``, logged here each iteration. ``decollate=False``: the output is one
``SALossOutput``, not per-sample predictions.

DDP (``torchrun --nproc_per_node N``): ``init_process_group``, wrap the whole ``SALModel`` in
``DistributedDataParallel`` (so the positional head's gradients are averaged too), give the loader a
``DistributedSampler`` and call ``sampler.set_epoch`` and ``dataset.set_epoch`` at
``Events.EPOCH_STARTED``, as below for the dataset; with ``persistent_workers=True`` the workers
keep their copy of the dataset and never see the new epoch, so keep them off.
"""

import argparse

import torch
from monai.engines import SupervisedTrainer
from monai.networks.nets import BasicUNet
from torch import nn
from torch.utils.data import DataLoader

from ignite.engine import Events
from salign_kernels import SALModel, SALoss, SALPrepareBatch, sal_total
from salign_kernels.data import SAMPLE_IMAGE, SlicePairDataset


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="a few-second run: 2 steps of tiny slices")
    args = parser.parse_args(argv)
    size, epochs, pairs = (32, 1, 4) if args.smoke else (args.size, args.epochs, None)
    dataset = SlicePairDataset(SAMPLE_IMAGE, size=size, foreground_threshold=0.05, pairs_per_volume=pairs)
    loader = DataLoader(dataset, batch_size=2 if args.smoke else 8, shuffle=True, num_workers=0)

    unet = BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=(8, 8, 16, 32, 64, 8))
    encoder = nn.Sequential(unet.conv_0, unet.down_1, unet.down_2, nn.Conv2d(16, 32, 1))  # stride 4
    model = SALModel(encoder, SALoss(in_channels=32, window=3, symmetric=True))
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=epochs, train_data_loader=loader, network=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),  # encoder and positional head
        loss_function=sal_total, prepare_batch=SALPrepareBatch(), decollate=False)

    @trainer.on(Events.EPOCH_STARTED)
    def fresh_pairs(engine):
        dataset.set_epoch(engine.state.epoch)

    @trainer.on(Events.ITERATION_COMPLETED)
    def log_parts(engine):
        out = engine.state.output["pred"]
        print(f"epoch {engine.state.epoch} iteration {engine.state.iteration}: total {out.total.item():.4f} "
              f"(local {out.local.item():.4f}, positional {out.positional.item():.4f})")

    trainer.run()


if __name__ == "__main__":
    main()
