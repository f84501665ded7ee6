"""Pre-train a MONAI 2D U-Net's encoder with self-supervised alignment (SAL) on NIfTI slice pairs.

    python examples/pretrain_sal.py                          # the bundled ICBM152 sample, ~2 min on 2 cores
    python examples/pretrain_sal.py --data my_scans/ --epochs 50 --size 128 --window 7
    torchrun --nproc_per_node 2 examples/pretrain_sal.py     # DDP: gloo on CPU, nccl on GPU

Each step encodes two nearby slices of one volume, embeds the encoder's features with a 1x1
convolution and minimises ``SALoss`` (local alignment + gp_weight * global position). It prints the
loss, pairs/second and the backend that ran each epoch, watches for feature collapse, and writes to
``--out`` (default ``outputs/``):

- ``sal_pretrain.pt``: the checkpoint (``unet``: the full BasicUNet state dict, whose encoder is
  pre-trained; ``embed`` and ``head``: the SAL-only layers; ``args``; ``history``);
- ``sal_history.json`` and ``sal_curves.png``: loss parts and feature spread per epoch;
- ``sal_matches.png``: for one pair of slices, where a grid of query pixels finds its best match,
  before and after pre-training.

``--batch-size`` is global: under torchrun each of the W processes takes batch_size / W pairs.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

import salign_kernels as sk
from salign_kernels import feature_mask
from salign_kernels.data import SAMPLE_IMAGE, SlicePairDataset, find_volumes

#: BasicUNet widths (conv_0, down_1..down_4, decoder out): small enough for a CPU demo.
FEATURES = (16, 16, 32, 64, 128, 16)
#: The SAL features live on the grid of ``down_2``: a quarter of the input's side.
FEATURE_STRIDE = 4


# ----------------------------------------------------------------------------------------- model
def build_unet(out_channels: int = 3, features=FEATURES, spatial_dims: int = 2):
    """MONAI's ``BasicUNet`` (instance norm, so per-sample and DDP-safe): 1 channel in, 2D or 3D."""
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=spatial_dims, in_channels=1, out_channels=out_channels,
                     features=tuple(features))


class SALEncoder(nn.Module):
    """A BasicUNet's encoder plus a 1x1 embedding: the features SAL pre-trains.

    The outputs of ``down_2`` (stride 4), ``down_3`` (8) and ``down_4`` (16) are brought to the stride-4
    grid ((bi/tri)linear), concatenated and embedded by a 1x1 convolution, so every encoder block gets a
    gradient while matching happens on a grid fine enough to be local. The encoder blocks are the U-Net's
    own modules (training them trains the U-Net); the decoder is left out, so that DDP, which expects a
    gradient for every parameter it holds, only holds what SAL trains. 2D or 3D, as the U-Net is.

    Shape: ``(B, 1, *spatial) -> (B, embed_dim, *spatial / 4)`` (every size a multiple of 16);
    ``(B, 1, S, S) -> (B, embed_dim, S / 4, S / 4)`` for slices.
    """

    BLOCKS = ("conv_0", "down_1", "down_2", "down_3", "down_4")

    def __init__(self, unet: nn.Module, embed_dim: int = 64) -> None:
        super().__init__()
        for name in self.BLOCKS:
            self.add_module(name, getattr(unet, name))
        first = unet.conv_0.conv_0.conv
        self.spatial_dims = first.weight.dim() - 2  # Conv2d or Conv3d: the U-Net's spatial_dims
        widths = [getattr(unet, name).convs.conv_1.conv.out_channels for name in self.BLOCKS[2:]]
        conv = nn.Conv3d if self.spatial_dims == 3 else nn.Conv2d
        self.embed = conv(sum(widths), embed_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = self.down_2(self.down_1(self.conv_0(x)))
        x3 = self.down_3(x2)
        x4 = self.down_4(x3)
        grid = x2.shape[2:]
        mode = "trilinear" if self.spatial_dims == 3 else "bilinear"
        up = [F.interpolate(t, size=grid, mode=mode, align_corners=False) for t in (x3, x4)]
        return self.embed(torch.cat([x2, *up], dim=1))


class SALPretrainer(nn.Module):
    """Encoder + ``SALoss`` in one module, so DDP sees (and all-reduces) every trained parameter.

    ``image_a``, ``image_b``: ``(B, 1, *spatial)`` slices or crops; masks ``(B, 1, *spatial)`` bool, as the
    pair datasets give them (channel-first), brought onto the features' grid by ``feature_mask``.
    """

    def __init__(self, encoder: SALEncoder, criterion: sk.SALoss) -> None:
        super().__init__()
        self.encoder, self.criterion = encoder, criterion

    def forward(self, image_a, image_b, pos_a, pos_b, mask_a=None, mask_b=None):
        # One pass over both images: instance norm makes it identical to two passes, and faster.
        feat_a, feat_b = self.encoder(torch.cat([image_a, image_b])).chunk(2)
        if mask_a is not None:
            mask_a, mask_b = feature_mask(mask_a, feat_a.shape[2:]), feature_mask(mask_b, feat_b.shape[2:])
        return self.criterion(feat_a, feat_b, pos_a, pos_b, mask_a, mask_b), feat_a.detach()


def feature_spread(features: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The collapse monitor: the per-channel std of the L2-normalised pixel (voxel) features.

    Returns ``(C,)`` stds over the batch's (foreground) pixels. ``sqrt(sum_c std_c^2)`` is the RMS
    distance of the unit feature vectors from their mean: about 1 for features spread over the
    sphere, 0 when every pixel has the same feature (collapse). ``features``: ``(B, C, *spatial)``,
    ``mask``: ``(B, *spatial)``.
    """
    x = F.normalize(features.float(), dim=1).movedim(1, -1)  # (B, *spatial, C)
    x = x[mask] if mask is not None and mask.any() else x.reshape(-1, x.shape[-1])
    return x.std(dim=0, unbiased=False)


# ----------------------------------------------------------------------------------------- DDP
def setup_distributed(device: torch.device):
    """``(rank, world_size, device)``; joins the process group when run by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    # A bounded wait: a process that loses its peer fails with an error instead of hanging.
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=5))
    return dist.get_rank(), world, device


def global_mean(value: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of a scalar over the processes (itself when there is one)."""
    value = value.detach().clone()
    if world > 1:
        dist.all_reduce(value)
        value /= world
    return value


class Run(NamedTuple):
    """Where this process stands: its rank among ``world`` processes, its device, and its log."""

    rank: int
    world: int
    device: torch.device
    log: Callable[..., None]

    @property
    def main_process(self) -> bool:
        return self.rank == 0


def start_run(args) -> Run:
    """Join the process group under torchrun, check that the batch divides, seed the weights."""
    rank, world, device = setup_distributed(pick_device(args.device))
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    return Run(rank, world, device, print if rank == 0 else (lambda *a, **k: None))


def end_run(run: Run) -> None:
    if run.world > 1:
        # Leave together: the first process writes pictures while the others would already be
        # tearing gloo down, and a process group torn down at different times can hang.
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------- training
def make_loader(dataset, args, run: Run):
    """``(sampler, loader)``: each process's share of every global batch of ``args.batch_size``.

    Every rank shuffles with the same seed and takes its share; with one process it is the same
    permutation, so the global batch of a step holds the same pairs whatever the process count.
    """
    sampler = DistributedSampler(dataset, num_replicas=run.world, rank=run.rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    # Workers can outlive an epoch: the dataset's set_epoch reaches them (its epoch is in shared memory).
    loader = DataLoader(dataset, batch_size=args.batch_size // run.world, sampler=sampler, drop_last=True,
                        num_workers=args.workers, persistent_workers=args.workers > 0)
    if len(loader) == 0:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the {len(dataset)} pairs of an epoch")
    return sampler, loader


class Trainer(NamedTuple):
    """What a step needs: ``trained`` is ``model`` wrapped in DDP when distributed; ``backend`` is the
    one ``SALoss`` runs on (``auto`` resolved)."""

    model: SALPretrainer
    trained: nn.Module
    optimizer: torch.optim.Optimizer
    backend: str


def make_trainer(encoder: SALEncoder, criterion: sk.SALoss, args, run: Run) -> Trainer:
    model = SALPretrainer(encoder, criterion).to(run.device)
    backend = sk.resolve_backend(args.backend, run.device)  # raises at once if a forced backend is missing
    trained = nn.parallel.DistributedDataParallel(model) if run.world > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    return Trainer(model, trained, optimizer, backend)


def train_epoch(trained: nn.Module, optimizer, loader, run: Run, *, inputs: Sequence[str], desc: str,
                progress: bool = True, max_steps: Optional[int] = None,
                on_first_step: Optional[Callable[[torch.Tensor], None]] = None) -> Dict:
    """One pass over ``loader``: a SAL step per batch. Returns the epoch's means and speed.

    ``inputs`` names the batch's two images (``("slice_a", "slice_b")``, ``("crop_a", "crop_b")``);
    ``on_first_step`` gets the first step's loss parts after the backward pass, before the update.
    Returns ``total``, ``local``, ``positional`` (means over steps and processes), ``spread`` (RMS of
    the feature spread, see :func:`feature_spread`), ``min_channel_std``, ``channels``, ``pairs``,
    ``pairs_per_s`` and ``seconds``.
    """
    from tqdm import tqdm

    device = run.device
    sums = torch.zeros(4, dtype=torch.float64)  # total, local, positional, spread^2
    min_std, steps, pairs, start = math.inf, 0, 0, time.perf_counter()
    # disable=None: a bar on a terminal only, not in logs; one bar, on the first process.
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True,
               disable=True if not run.main_process or not progress else None)
    for batch in bar:
        masks = (batch["mask_a"].to(device), batch["mask_b"].to(device)) if "mask_a" in batch else (None, None)
        out, feat_a = trained(batch[inputs[0]].to(device), batch[inputs[1]].to(device),
                              batch["pos_a"].to(device), batch["pos_b"].to(device), *masks)
        optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        parts = torch.stack([global_mean(t, run.world) for t in out]).cpu()
        if on_first_step is not None and steps == 0:
            on_first_step(parts)
        optimizer.step()

        stds = feature_spread(feat_a, None if masks[0] is None else feature_mask(masks[0], feat_a.shape[2:]))
        sums += torch.cat([parts, stds.pow(2).sum().reshape(1).cpu()]).double()
        min_std = min(min_std, float(stds.min()))
        steps += 1
        pairs += len(batch[inputs[0]]) * run.world
        bar.set_postfix(loss=f"{float(parts[0]):.4f}")
        if max_steps is not None and steps >= max_steps:
            break
    seconds = time.perf_counter() - start
    mean = (sums / steps).tolist()
    return {"total": mean[0], "local": mean[1], "positional": mean[2], "spread": math.sqrt(mean[3]),
            "min_channel_std": min_std, "channels": feat_a.shape[1], "pairs": pairs,
            "pairs_per_s": pairs / seconds, "seconds": seconds}


def run_epochs(args, run: Run, trainer: Trainer, dataset, sampler, loader, *, inputs: Sequence[str],
               checkpoint_of: Callable[[List[Dict]], Dict], path: Path) -> Tuple[List[Dict], Dict]:
    """``args.epochs`` epochs of :func:`train_epoch`, each reported, then checkpointed to ``path``.

    ``checkpoint_of(history)`` builds the checkpoint after each epoch (the first process saves it).
    Returns ``(history, the last checkpoint)``; ``history`` holds one record per epoch: the epoch,
    :func:`train_epoch`'s numbers and the backend.
    """
    history: List[Dict] = []
    for epoch in range(1, args.epochs + 1):
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        first_step = None
        if args.save_first_step is not None and epoch == 1:
            first_step = lambda parts: save_first_step(args.save_first_step, trainer.model, parts,
                                                       run.main_process)
        means = train_epoch(trainer.trained, trainer.optimizer, loader, run, inputs=inputs,
                            desc=f"epoch {epoch}/{args.epochs}", progress=not args.no_progress,
                            max_steps=2 if args.smoke else None, on_first_step=first_step)
        history.append({"epoch": epoch, **means, "backend": trainer.backend})
        report_epoch(history[-1], args.epochs, run, args.collapse_threshold)
        checkpoint = checkpoint_of(history)
        if run.main_process:
            torch.save(checkpoint, path)
    return history, checkpoint


def report_epoch(record: Dict, epochs: int, run: Run, collapse_threshold: float) -> None:
    """Print the epoch's line; warn (first process) when the features collapse."""
    run.log(f"epoch {record['epoch']:>3}/{epochs}  loss {record['total']:.4f} (local {record['local']:.4f}, "
            f"positional {record['positional']:.4f})  spread {record['spread']:.3f}  "
            f"{record['pairs_per_s']:.1f} pairs/s  backend {record['backend']}")
    if record["spread"] < collapse_threshold and run.main_process:
        warnings.warn(f"feature collapse: spread {record['spread']:.3f} < {collapse_threshold} "
                      "(all pixels get nearly the same feature; raise --gp-weight or lower --lr)",
                      RuntimeWarning, stacklevel=1)


def report_done(history: List[Dict], run: Run) -> None:
    seconds = sum(h["seconds"] for h in history)
    pairs = sum(h["pairs"] for h in history)
    run.log(f"done: {len(history)} epochs in {seconds:.0f} s, {pairs / seconds:.1f} pairs/s "
            f"with backend {history[-1]['backend']}")


# ----------------------------------------------------------------------------------------- picture
@torch.no_grad()
def match_picture(encoders: Dict[str, nn.Module], dataset: SlicePairDataset, path: Path, device,
                  backend: str, grid: int = 8) -> Dict[str, Dict[str, float]]:
    """Draw where a grid of query pixels of slice i finds its best match in slice j (dense matching).

    One row per encoder (e.g. before and after pre-training). Left: slice i with the queries, one colour
    each. Right: slice j with each query's match (x) and an arrow from the query's own place to it.
    The two slices are ``max_offset`` apart in one volume and show nearly the same anatomy in the same
    place, so short arrows mean the features tell places apart. Returns per encoder the mean shift
    (pixels) over all foreground queries and the fraction matched within one feature cell.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stack = dataset.volumes[0]
    first, last = dataset.ranges[0]
    i = (first + last) // 2
    j = min(i + dataset.max_offset, last)
    images = torch.from_numpy(stack.images[[i, j]]).unsqueeze(1).to(device)  # (2, 1, S, S)
    S = images.shape[-1]
    threshold = dataset.foreground_threshold if dataset.foreground_threshold is not None else 0.05

    fig, axes = plt.subplots(len(encoders), 2, figsize=(8, 4.3 * len(encoders)), squeeze=False)
    stats = {}
    for (left, right), (title, encoder) in zip(axes, encoders.items()):
        feats = encoder(images).float()
        h, w = feats.shape[-2:]
        masks = feature_mask(images[:, 0] > threshold, (h, w))
        _, index = sk.dense_match(feats[:1], feats[1:], mask_a=masks[:1], mask_b=masks[1:], backend=backend)
        index = index[0].cpu()  # (h, w): flat indices into slice j's grid, -1 where masked out
        qh, qw = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        valid = index >= 0
        shift = torch.stack([index // w - qh, index % w - qw], -1)[valid].float()  # (n, 2) in cells
        scale = S / h
        stats[title] = {"mean_shift_px": float(shift.norm(dim=1).mean()) * scale,
                        "within_one_cell": float((shift.abs().max(dim=1).values <= 1).float().mean())}

        step = max(1, round(math.sqrt(masks[0].sum().item() / grid**2)))
        pick = valid & (qh % step == step // 2) & (qw % step == step // 2)
        to_pixels = lambda t: (t.float() + 0.5) * scale - 0.5  # feature cell centre -> image pixel
        src = to_pixels(torch.stack([qh[pick], qw[pick]], 1))
        dst = to_pixels(torch.stack([index[pick] // w, index[pick] % w], 1))
        colours = plt.cm.hsv(torch.linspace(0, 0.9, len(src)).numpy())
        # Display: array axis 0 to the right, axis 1 upward (RAS+ axial: right-left, posterior-anterior).
        for ax, image in ((left, images[0, 0]), (right, images[1, 0])):
            ax.imshow(image.cpu().T.numpy(), cmap="gray", origin="lower", vmin=0, vmax=1)
            ax.axis("off")
        left.scatter(src[:, 0], src[:, 1], c=colours, s=14)
        right.scatter(dst[:, 0], dst[:, 1], c=colours, s=22, marker="x")
        for (a0, a1), (b0, b1), colour in zip(src.tolist(), dst.tolist(), colours):
            right.annotate("", xy=(b0, b1), xytext=(a0, a1),
                           arrowprops={"arrowstyle": "->", "color": colour, "lw": 0.8})
        left.set_title(f"{title}: queries in slice {i}", fontsize=9)
        right.set_title(f"their best matches in slice {j}\nmean shift {stats[title]['mean_shift_px']:.1f} px, "
                        f"{100 * stats[title]['within_one_cell']:.0f}% within 1 feature cell", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return stats


def curves_picture(history: List[Dict], path: Path, collapse_threshold: Optional[float] = None) -> None:
    """Save :func:`curves_figure` to ``path``."""
    import matplotlib.pyplot as plt

    fig = curves_figure(history, collapse_threshold)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curves_figure(history: List[Dict], collapse_threshold: Optional[float] = None):
    """Three panels per epoch: the local loss (log axis: it falls by orders of magnitude while the
    positional part barely moves), the positional and total losses, and the collapse monitor with
    its threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (local, parts, monitor) = plt.subplots(1, 3, figsize=(14, 3.8))
    local.semilogy(epochs, [max(h["local"], 1e-12) for h in history], "o-", color="C1",
                   label="local alignment (1 - matched cosine)")
    local.set_title("Local alignment loss (log scale)")
    for key, colour in (("total", "C0"), ("positional", "C2")):
        parts.plot(epochs, [h[key] for h in history], "o-", color=colour, label=key)
    parts.set_title("Positional loss (L1 of the offset) and total")
    monitor.plot(epochs, [h["spread"] for h in history], "o-", label="spread: RMS distance of unit features to their mean")
    monitor.plot(epochs, [h["min_channel_std"] * math.sqrt(h["channels"]) for h in history], "s:",
                 label="weakest channel: its std x sqrt(C)")
    if collapse_threshold is not None:
        monitor.axhline(collapse_threshold, color="red", ls="--", lw=1,
                        label=f"collapse threshold {collapse_threshold:g} (a warning below)")
    monitor.set_ylim(bottom=0)
    monitor.set_title("Collapse monitor (about 1: spread out; 0: collapsed)")
    for ax in (local, parts, monitor):
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    local.set_ylabel("loss")
    fig.suptitle(f"SAL pre-training: loss parts and feature spread over {len(history)} epochs", fontsize=10)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------- main
def parse_threshold(text: str) -> Optional[float]:
    return None if text.lower() == "none" else float(text)


def parse_window(text: str) -> Optional[int]:
    return None if text.lower() in ("none", "dense") else int(text)


def add_data_args(p: argparse.ArgumentParser) -> None:
    """The flags of what is read: files, modality, foreground masks."""
    p.add_argument("--data", nargs="+", default=[str(SAMPLE_IMAGE)],
                   help="NIfTI files and/or folders searched recursively (default: the bundled sample)")
    p.add_argument("--modality", default="auto", choices=("auto", "ct", "mr"))
    p.add_argument("--fg-threshold", type=parse_threshold, default=0.05,
                   help="foreground = normalised intensity above this; 'none' for no masks")


def add_training_args(p: argparse.ArgumentParser, *, embed_dim: int, epochs: int, pairs_per_epoch: int,
                      batch_size: int) -> None:
    """The flags of the loss, the optimisation, the run and its outputs, with these defaults."""
    p.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--gp-weight", type=float, default=1.0)
    p.add_argument("--embed-dim", type=int, default=embed_dim)
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--pairs-per-epoch", type=int, default=pairs_per_epoch,
                   help="pairs drawn per epoch over all volumes")
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help="global batch (divided among DDP processes)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "cpp", "triton"))
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--collapse-threshold", type=float, default=0.1,
                   help="warn when the feature spread falls below this (1 = spread out, 0 = collapsed)")
    p.add_argument("--out", type=Path, default=Path("outputs"))
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--smoke", action="store_true", help="a few steps on tiny inputs (for tests)")
    p.add_argument("--save-first-step", type=Path, help=argparse.SUPPRESS)  # DDP test: loss + gradients


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    p.add_argument("--axis", type=int, default=2, help="slicing axis of the RAS+ volume: 0 sag., 1 cor., 2 axial")
    p.add_argument("--size", type=int, default=96, help="side of the square slices, a multiple of 16")
    p.add_argument("--max-offset", type=int, default=3, help="largest slice distance of a pair")
    p.add_argument("--slab", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="draw pairs only from slices at positions in [LOW, HIGH] (hold out the rest)")
    p.add_argument("--window", type=parse_window, default=None, help="odd window size, or 'none' (dense)")
    add_training_args(p, embed_dim=64, epochs=8, pairs_per_epoch=640, batch_size=16)
    return p


def check_training_args(args) -> None:
    """Reject bad values of the shared flags with a message naming the flag."""
    for flag in ("epochs", "pairs_per_epoch", "batch_size", "embed_dim"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 1; got {getattr(args, flag)}")


def check_args(args) -> None:
    """Reject bad values with a message naming the flag (argparse handles types and choices)."""
    if args.size < 16 or args.size % 16:
        raise SystemExit(f"--size must be a multiple of 16 (the U-Net halves it four times); got {args.size}")
    check_training_args(args)
    if args.max_offset < 1:
        raise SystemExit(f"--max-offset must be >= 1; got {args.max_offset}")
    if args.window is not None and args.window > args.size // FEATURE_STRIDE:
        raise SystemExit(f"--window {args.window} is larger than the feature map "
                         f"({args.size // FEATURE_STRIDE} = size / {FEATURE_STRIDE})")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pretrain(args) -> Dict:
    """Run the pre-training described by ``args`` (see :func:`build_parser`); returns the checkpoint."""
    check_args(args)
    run = start_run(args)
    log, device = run.log, run.device

    paths = collect_paths(args.data)
    dataset = SlicePairDataset(
        paths, axis=args.axis, size=args.size, max_offset=args.max_offset, foreground_threshold=args.fg_threshold,
        modality=args.modality, slab=tuple(args.slab) if args.slab else None, seed=args.seed,
        pairs_per_volume=max(1, math.ceil(args.pairs_per_epoch / len(paths))),
    )
    sampler, loader = make_loader(dataset, args, run)

    unet = build_unet()
    encoder = SALEncoder(unet, args.embed_dim)
    initial_encoder = copy.deepcopy(encoder)
    criterion = sk.SALoss(args.embed_dim, window=args.window, symmetric=args.symmetric,
                          gp_weight=args.gp_weight, backend=args.backend)
    trainer = make_trainer(encoder, criterion, args, run)
    backend = trainer.backend

    volumes = len(dataset.volumes)
    slices = sum(v.num_slices for v in dataset.volumes)
    log(f"SAL pre-training: {volumes} volume(s), {slices} slices of {args.size}x{args.size} along axis "
        f"{args.axis}; features {args.embed_dim} x {args.size // FEATURE_STRIDE}^2; "
        f"{'dense' if args.window is None else f'window {args.window}'}, symmetric={args.symmetric}, "
        f"gp_weight={args.gp_weight}")
    log(f"backend {backend} on {device} ({'DDP x %d, ' % run.world if run.world > 1 else ''}"
        f"{torch.get_num_threads()} threads); {len(loader)} steps of {args.batch_size} pairs per epoch")

    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint_of = lambda history: {
        "unet": unet.state_dict(), "embed": encoder.embed.state_dict(), "head": criterion.head.state_dict(),
        "features": FEATURES, "args": jsonable(args), "history": history, "backend": backend}
    history, checkpoint = run_epochs(args, run, trainer, dataset, sampler, loader,
                                     inputs=("slice_a", "slice_b"), checkpoint_of=checkpoint_of,
                                     path=args.out / "sal_pretrain.pt")

    if run.main_process:
        (args.out / "sal_history.json").write_text(json.dumps(history, indent=1))
        curves_picture(history, args.out / "sal_curves.png", args.collapse_threshold)
        encoder.eval(), initial_encoder.to(device).eval()
        matches = match_picture({"random init": initial_encoder, "after SAL": encoder}, dataset,
                                args.out / "sal_matches.png", device, args.backend)
        report_done(history, run)
        checkpoint["matches"] = matches
        torch.save(checkpoint, args.out / "sal_pretrain.pt")
        for title, st in matches.items():
            log(f"dense matches of a slice pair, {title}: mean shift {st['mean_shift_px']:.2f} px, "
                f"{100 * st['within_one_cell']:.1f}% within one feature cell")
        log(f"wrote {args.out / 'sal_pretrain.pt'}, {args.out / 'sal_matches.png'}, {args.out / 'sal_curves.png'}")
    end_run(run)
    return checkpoint


def collect_paths(data: List[str]) -> List[Path]:
    """The files named by ``--data``: files as given, folders searched for NIfTI files."""
    found: List[Path] = []
    for entry in map(Path, data):
        found.extend(find_volumes(entry) if entry.is_dir() else [entry])
    return found


def save_first_step(path: Path, model: nn.Module, parts: torch.Tensor, main_process: bool) -> None:
    """The first step's loss parts and (all-reduced) gradients, for the DDP test."""
    if main_process:
        grads = {name: p.grad.detach().cpu().clone() for name, p in model.named_parameters() if p.grad is not None}
        torch.save({"loss": parts, "grads": grads}, path)


def jsonable(args) -> Dict:
    """The flags as a plain dict (paths as strings), for the checkpoint."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.smoke:  # tiny and fast: for the tests
        args.size, args.epochs, args.batch_size, args.pairs_per_epoch = 32, 1, 4, 8
        args.embed_dim = min(args.embed_dim, 16)
    pretrain(args)


if __name__ == "__main__":
    main()
