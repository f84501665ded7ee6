"""Pre-train a MONAI 3D U-Net's encoder with self-supervised alignment (SAL) on NIfTI sub-volume pairs.

    python examples/pretrain_sal3d.py                        # the bundled ICBM152 sample at 3 mm
    python examples/pretrain_sal3d.py --data my_scans/ --spacing 2 --crop 48 --window 3 --epochs 50
    python examples/pretrain_sal3d.py --max-offset 4 4 0 --window 1 3 3   # in-plane offsets and windows
    torchrun --nproc_per_node 2 examples/pretrain_sal3d.py   # DDP: gloo on CPU, nccl on GPU

The 3D sibling of ``pretrain_sal.py``, built from its blocks. Each step encodes two crops of one volume
whose corners differ by at most ``--max-offset`` voxels per axis (``SubVolumePairDataset``), embeds the
3D encoder's features with a 1x1x1 convolution and minimises ``SALoss(..., pos_dims=3)``: the 3D local
alignment (dense, or windowed with ``--window``) plus ``gp_weight`` times the positional loss on the
crops' normalised centres. It prints the loss parts, pairs/second, the backend that ran and the
feature spread (the collapse monitor) each epoch, and writes to ``--out`` (default ``outputs/``):

- ``sal3d_pretrain.pt``: the checkpoint (``unet``: the full 3D BasicUNet state dict, whose encoder is
  pre-trained; ``embed`` and ``head``: the SAL-only layers; ``args``; ``history``; ``matches``);
- ``sal3d_history.json`` and ``sal3d_curves.png``: loss parts and feature spread per epoch;
- ``sal3d_matches.png``: for one pair of crops, where a grid of query voxels finds its best match,
  on the axial, coronal and sagittal slices through the first crop's centre, before and after
  pre-training.

Array axes are those of the RAS+ volume: 0 toward Right, 1 Anterior, 2 Superior; ``--crop``,
``--max-offset``, ``--spacing`` and ``--window`` take one value (every axis) or three.
``--batch-size`` is global: under torchrun each of the W processes takes batch_size / W pairs.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pretrain_sal, when run from elsewhere
import pretrain_sal as blocks  # noqa: E402
from pretrain_sal import FEATURE_STRIDE, SALEncoder  # noqa: E402

import salign_kernels as sk  # noqa: E402
from salign_kernels import feature_mask  # noqa: E402
from salign_kernels.data import SubVolumePairDataset  # noqa: E402

#: 3D BasicUNet widths (conv_0, down_1..down_4, decoder out): half the 2D example's, for a CPU.
FEATURES = (8, 8, 16, 32, 64, 8)
#: The planes of the picture: (the axis held fixed, its name) in the RAS+ array.
PLANES = ((2, "axial"), (1, "coronal"), (0, "sagittal"))


# ----------------------------------------------------------------------------------------- picture
def picture_pair(dataset: SubVolumePairDataset) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """The pair the picture shows: crop a at the centre of the first volume, crop b shifted by the
    largest offset that stays inside on every axis (toward the far side where there is room)."""
    shape, crop, max_offset = dataset.volumes[0].shape, dataset.crop_size, dataset.max_offset
    corner_a = tuple((n - s) // 2 for n, s in zip(shape, crop))
    offset = []
    for n, s, m, a in zip(shape, crop, max_offset, corner_a):
        up, down = min(m, n - s - a), min(m, a)
        offset.append(up if up >= down else -down)
    return corner_a, tuple(a + d for a, d in zip(corner_a, offset))


@torch.no_grad()
def match_picture(encoders: Dict[str, nn.Module], dataset: SubVolumePairDataset, path: Path, device,
                  backend: str, queries: int = 4) -> Dict[str, Dict[str, float]]:
    """Draw where a grid of query voxels of crop a finds its best match in crop b (dense matching).

    One row per encoder (e.g. before and after pre-training), one column per plane: the axial,
    coronal and sagittal slices of the volume through crop a's central feature cell, with crop a
    (solid) and crop b (dashed) outlined. Queries (dots, about ``queries`` per side) are the feature
    cells of crop a in that plane; each match (x) is drawn where its cell lies in the volume,
    projected onto the slice, with an arrow from its query. Both crops hold the same anatomy where
    they overlap, so short arrows mean the features tell places apart.

    Returns per encoder, over every foreground query of the crop (not only those drawn):
    ``mean_shift_mm``, the mean distance between a query's place in the volume and its match's;
    ``nearest_cell``, the fraction matched to the cell nearest to the query's place (within half a
    cell on every axis); ``same_cell_in_crop``, the fraction matched to the cell at the query's place
    *in the crop* instead: what features that encode the position within the crop rather than the
    anatomy give, and which the local alignment loss alone cannot tell from true matches.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    volume = dataset.volumes[0]
    corner_a, corner_b = picture_pair(dataset)
    crops = torch.from_numpy(np.stack([dataset.crop(0, corner_a), dataset.crop(0, corner_b)]))
    crops = crops.unsqueeze(1).to(device)  # (2, 1, d, h, w)
    threshold = dataset.foreground_threshold if dataset.foreground_threshold is not None else 0.05
    crop = torch.tensor(dataset.crop_size, dtype=torch.float32)

    fig, axes = plt.subplots(len(encoders), 3, figsize=(12, 4.4 * len(encoders)), squeeze=False)
    stats = {}
    for row, (title, encoder) in zip(axes, encoders.items()):
        feats = encoder(crops).float()
        grid = tuple(feats.shape[2:])
        masks = feature_mask(crops[:, 0] > threshold, grid)
        _, index = sk.dense_match(feats[:1], feats[1:], mask_a=masks[:1], mask_b=masks[1:], backend=backend)
        index = index[0].cpu()  # (g0, g1, g2): flat indices into crop b's grid, -1 where masked out
        valid = index >= 0
        cells = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij"), -1)  # (*grid, 3)
        matched = torch.stack(torch.unravel_index(index.clamp(min=0), grid), -1)
        stride = crop / torch.tensor(grid, dtype=torch.float32)
        # A feature cell's centre, in voxels of the volume: its crop's corner + the cell's place in it.
        to_volume = lambda cell, corner: torch.tensor(corner) + (cell.float() + 0.5) * stride - 0.5
        src, dst = to_volume(cells, corner_a), to_volume(matched, corner_b)  # (*grid, 3)
        shift = (dst - src)[valid]
        stats[title] = {
            "mean_shift_mm": float((shift * torch.tensor(volume.spacing)).norm(dim=1).mean()),
            "nearest_cell": float((shift.abs() <= stride / 2).all(dim=1).float().mean()),
            "same_cell_in_crop": float((matched == cells).all(dim=-1)[valid].float().mean()),
        }

        for ax, (axis, name) in zip(row, PLANES):
            u, v = (k for k in range(3) if k != axis)
            centre = grid[axis] // 2
            plane = int(round(float(to_volume(torch.tensor(centre), corner_a[axis])[axis])))
            # Display: the lower-numbered remaining axis to the right, the other upward.
            ax.imshow(np.take(volume.image, plane, axis=axis).T, cmap="gray", origin="lower", vmin=0, vmax=1)
            for corner, style in ((corner_a, "-"), (corner_b, "--")):
                ax.add_patch(Rectangle((corner[u] - 0.5, corner[v] - 0.5), dataset.crop_size[u],
                                       dataset.crop_size[v], fill=False, ec="yellow", ls=style, lw=0.8))
            step = max(1, round(max(grid[u], grid[v]) / queries))
            pick = (valid & (cells[..., axis] == centre) & (cells[..., u] % step == step // 2)
                    & (cells[..., v] % step == step // 2))
            a_uv, b_uv = src[pick][:, [u, v]], dst[pick][:, [u, v]]
            colours = plt.cm.hsv(torch.linspace(0, 0.9, len(a_uv)).numpy())
            ax.scatter(a_uv[:, 0], a_uv[:, 1], c=colours, s=14)
            ax.scatter(b_uv[:, 0], b_uv[:, 1], c=colours, s=22, marker="x")
            for (a0, a1), (b0, b1), colour in zip(a_uv.tolist(), b_uv.tolist(), colours):
                ax.annotate("", xy=(b0, b1), xytext=(a0, a1),
                            arrowprops={"arrowstyle": "->", "color": colour, "lw": 0.8})
            ax.set_title(f"{name} slice, axis {axis} = {plane}", fontsize=9)
            ax.axis("off")
        # The encoder's numbers above its middle panel, which has room on both sides.
        row[1].set_title(f"{title}: mean shift {stats[title]['mean_shift_mm']:.1f} mm, "
                         f"{100 * stats[title]['nearest_cell']:.0f}% at the nearest cell, "
                         f"{100 * stats[title]['same_cell_in_crop']:.0f}% at the same cell of the crop\n"
                         f"{row[1].get_title()}", fontsize=9)
    fig.suptitle(f"matches of crop a {tuple(corner_a)} (solid) in crop b {tuple(corner_b)} (dashed), "
                 f"{'x'.join(map(str, dataset.crop_size))} voxels of {volume.spacing[0]:.1f} mm", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return stats


# ----------------------------------------------------------------------------------------- main
def per_axis(kind, allow_none: bool = False):
    """An argparse ``type`` for one value of a flag that takes 1 or 3 values (or 'none')."""

    def parse(text: str):
        if allow_none and text.lower() in ("none", "dense"):
            return None
        try:
            return kind(text)
        except ValueError:
            what = "an int" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None

    return parse


def axes_value(values: Optional[List], flag: str, minimum=None, *, allow_none: bool = False):
    """A flag's 1 or 3 values -> a tuple of 3 (or None for 'none'), each ``>= minimum`` when given."""
    if allow_none and values in (None, [None]):
        return None
    if None in values or len(values) not in (1, 3):
        raise SystemExit(f"{flag} takes one value (every axis) or three (one per axis)"
                         f"{' or none' if allow_none else ''}; got {' '.join(map(str, values))}")
    if minimum is not None and min(values) < minimum:
        raise SystemExit(f"{flag} must be >= {minimum} on every axis; got {' '.join(map(str, values))}")
    return tuple(values) * 3 if len(values) == 1 else tuple(values)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    blocks.add_data_args(p)
    p.add_argument("--spacing", nargs="+", type=per_axis(float, allow_none=True), default=[3.0], metavar="MM",
                   help="resample to this voxel size in mm (1 or 3 values); 'none': the files' grids")
    p.add_argument("--crop", nargs="+", type=per_axis(int), default=[32], metavar="N",
                   help="crop size in voxels (1 or 3 values, multiples of 16)")
    p.add_argument("--max-offset", nargs="+", type=per_axis(int), default=[4], metavar="N",
                   help="largest corner offset of a pair in voxels (1 or 3 values)")
    p.add_argument("--window", nargs="+", type=per_axis(int, allow_none=True), default=[None], metavar="K",
                   help="odd window size on the feature grid (1 or 3 values), or 'none' (dense)")
    blocks.add_training_args(p, embed_dim=32, epochs=4, pairs_per_epoch=64, batch_size=4)
    return p


def check_args(args) -> None:
    """Turn the per-axis flags into tuples and reject bad values, naming the flag."""
    args.crop = axes_value(args.crop, "--crop", 16)
    if any(s % 16 for s in args.crop) or max(args.crop) < 32:
        raise SystemExit(f"--crop must be multiples of 16, at least one of them >= 32 (the U-Net halves the "
                         "crop four times, and instance norm needs more than one voxel there); "
                         f"got {args.crop}")
    args.max_offset = axes_value(args.max_offset, "--max-offset", 0)
    if max(args.max_offset) < 1:
        raise SystemExit(f"--max-offset must be >= 1 on at least one axis; got {args.max_offset}")
    args.spacing = axes_value(args.spacing, "--spacing", allow_none=True)
    if args.spacing is not None and min(args.spacing) <= 0:
        raise SystemExit(f"--spacing must be > 0 mm; got {args.spacing}")
    args.window = axes_value(args.window, "--window", 1, allow_none=True)
    grid = tuple(s // FEATURE_STRIDE for s in args.crop)
    if args.window is not None and any(k > g for k, g in zip(args.window, grid)):
        raise SystemExit(f"--window {args.window} is larger than the feature map {grid} "
                         f"(crop / {FEATURE_STRIDE})")
    blocks.check_training_args(args)


def pretrain(args) -> Dict:
    """Run the pre-training described by ``args`` (see :func:`build_parser`); returns the checkpoint."""
    check_args(args)
    run = blocks.start_run(args)
    log, device = run.log, run.device
    window = args.window if args.window is None or len(set(args.window)) > 1 else args.window[0]
    # Built before the data is read, so a bad window (e.g. even) fails at once.
    criterion = sk.SALoss(args.embed_dim, window=window, symmetric=args.symmetric, gp_weight=args.gp_weight,
                          pos_dims=3, backend=args.backend)

    paths = blocks.collect_paths(args.data)
    dataset = SubVolumePairDataset(
        paths, crop_size=args.crop, max_offset=args.max_offset, spacing=args.spacing,
        foreground_threshold=args.fg_threshold, modality=args.modality, seed=args.seed,
        pairs_per_volume=max(1, math.ceil(args.pairs_per_epoch / len(paths))),
    )
    sampler, loader = blocks.make_loader(dataset, args, run)

    unet = blocks.build_unet(features=FEATURES, spatial_dims=3)
    encoder = SALEncoder(unet, args.embed_dim)
    initial_encoder = copy.deepcopy(encoder)
    trainer = blocks.make_trainer(encoder, criterion, args, run)
    backend = trainer.backend

    size = lambda sizes: "x".join(map(str, sizes))
    shapes = ", ".join(size(v.shape) for v in dataset.volumes[:3]) + (", ..." if len(paths) > 3 else "")
    grid = "the files' grids" if args.spacing is None else f"{'/'.join(map(str, args.spacing))} mm voxels"
    log(f"SAL 3D pre-training: {len(paths)} volume(s) of {shapes} ({grid}); crops {size(args.crop)}, "
        f"offsets up to {args.max_offset}; "
        f"features {args.embed_dim} x {size(s // FEATURE_STRIDE for s in args.crop)}; "
        f"{'dense' if window is None else f'window {window}'}, symmetric={args.symmetric}, "
        f"gp_weight={args.gp_weight}")
    log(f"backend {backend} on {device} ({'DDP x %d, ' % run.world if run.world > 1 else ''}"
        f"{torch.get_num_threads()} threads); {len(loader)} steps of {args.batch_size} pairs per epoch")

    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint_of = lambda history: {
        "unet": unet.state_dict(), "embed": encoder.embed.state_dict(), "head": criterion.head.state_dict(),
        "features": FEATURES, "spatial_dims": 3, "args": blocks.jsonable(args), "history": history,
        "backend": backend}
    history, checkpoint = blocks.run_epochs(args, run, trainer, dataset, sampler, loader,
                                            inputs=("crop_a", "crop_b"), checkpoint_of=checkpoint_of,
                                            path=args.out / "sal3d_pretrain.pt")

    if run.main_process:
        (args.out / "sal3d_history.json").write_text(json.dumps(history, indent=1))
        blocks.curves_picture(history, args.out / "sal3d_curves.png", args.collapse_threshold)
        encoder.eval(), initial_encoder.to(device).eval()
        matches = match_picture({"random init": initial_encoder, "after SAL": encoder}, dataset,
                                args.out / "sal3d_matches.png", device, args.backend)
        blocks.report_done(history, run)
        checkpoint["matches"] = matches
        torch.save(checkpoint, args.out / "sal3d_pretrain.pt")
        for title, st in matches.items():
            log(f"dense matches of a sub-volume pair, {title}: mean shift {st['mean_shift_mm']:.1f} mm, "
                f"{100 * st['nearest_cell']:.1f}% at the nearest cell, {100 * st['same_cell_in_crop']:.1f}% "
                "at the same cell of the crop")
        log(f"wrote {args.out / 'sal3d_pretrain.pt'}, {args.out / 'sal3d_matches.png'}, "
            f"{args.out / 'sal3d_curves.png'}")
    blocks.end_run(run)
    return checkpoint


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.smoke:  # two steps of two pairs: for the tests (the crops stay as given, 32 is the smallest)
        args.epochs, args.batch_size, args.pairs_per_epoch = 1, 2, 4
        args.embed_dim = min(args.embed_dim, 8)
    pretrain(args)


if __name__ == "__main__":
    main()
