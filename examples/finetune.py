"""Few-label fine-tuning: does SAL pre-training help a U-Net segment with k = 1, 3, 10 labelled slices?

    python examples/finetune.py                            # pre-train, then fine-tune both arms, 3 seeds
    python examples/finetune.py --checkpoint outputs/finetune/sal_pretrain.pt   # reuse a pre-training

Task: grey / white matter segmentation of the bundled ICBM152 sample's axial slices (labels 1, 2;
background and CSF 0). The slices are split into slabs by position ``i / (D - 1)`` so that no slice
leaks between them:

- pre-training (no labels): slices in ``--pretrain-slab`` (default [0, 0.55]);
- labelled training slices: k slices drawn per seed from ``--train-slab`` (default [0.30, 0.55]);
- test: every slice in ``--test-slab`` (default [0.65, 0.85]), 16 mm above the rest; it is used by
  neither pre-training nor fine-tuning.

For every seed and k, two copies of the same randomly initialised BasicUNet are fine-tuned on the same
slices with the same schedule; one first gets the SAL-pre-trained encoder (``conv_0``, ``down_1`` ..
``down_4``). The Dice of grey and white matter on the test slab (computed over the whole slab) is
reported as mean +- std over the seeds, as a Markdown table, in ``--out``/finetune_results.json and
finetune_curves.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pretrain_sal, when imported from elsewhere
import pretrain_sal  # noqa: E402

from salign_kernels.data import SAMPLE_IMAGE, SAMPLE_LABEL, SliceStack, load_slices  # noqa: E402

ENCODER_BLOCKS = ("conv_0.", "down_1.", "down_2.", "down_3.", "down_4.")
CLASSES = {1: "grey matter", 2: "white matter"}


def slab_indices(stack: SliceStack, slab) -> np.ndarray:
    """The slices whose position ``i / (D - 1)`` lies in ``[low, high]``."""
    positions = np.arange(stack.num_slices) / max(stack.num_slices - 1, 1)
    return np.flatnonzero((positions >= slab[0] - 1e-9) & (positions <= slab[1] + 1e-9))


def encoder_state(checkpoint: Dict) -> Dict[str, torch.Tensor]:
    """The pre-trained encoder's weights out of a ``pretrain_sal`` checkpoint's full U-Net state."""
    return {k: v for k, v in checkpoint["unet"].items() if k.startswith(ENCODER_BLOCKS)}


def dice_per_class(logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """Dice of each foreground class over the whole stack (one 3D overlap, not a mean over slices).

    Shape: ``logits`` ``(D, C, S, S)``, ``labels`` ``(D, S, S)`` int64.
    """
    from monai.metrics import compute_dice

    num_classes = logits.shape[1]
    pred = F.one_hot(logits.argmax(1), num_classes).permute(3, 0, 1, 2).unsqueeze(0)  # (1, C, D, S, S)
    true = F.one_hot(labels, num_classes).permute(3, 0, 1, 2).unsqueeze(0)
    dice = compute_dice(pred, true, include_background=False)[0]  # (C - 1,)
    return {CLASSES[c]: float(dice[c - 1]) for c in CLASSES}


def fit(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, steps: int, lr: float, device,
        every: int = 0, on_eval: Optional[Callable[[int, torch.nn.Module], None]] = None) -> List[float]:
    """The fine-tuning recipe: Adam at ``lr``, Dice + cross-entropy, ``steps`` steps on all k slices.

    Every step sees all k slices, each flipped left-right with probability 1/2 (the brain is nearly
    symmetric, so this is a label-preserving augmentation). ``on_eval(step, model)`` is called after
    every ``every``-th step (``every > 0``), the model in eval mode, then training resumes.
    Returns the training loss per step. Shape: ``images`` ``(k, 1, S, S)``, ``labels`` ``(k, S, S)``.
    """
    from monai.losses import DiceCELoss

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    criterion = DiceCELoss(to_onehot_y=True, softmax=True)
    images, labels = images.to(device), labels.to(device)
    curve = []
    model.train()
    for step in range(1, steps + 1):
        flip = torch.rand(images.shape[0], device=device) < 0.5
        x = torch.where(flip[:, None, None, None], images.flip(-2), images)  # axis 0 of a slice: left-right
        y = torch.where(flip[:, None, None], labels.flip(-2), labels)
        loss = criterion(model(x), y.unsqueeze(1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        curve.append(float(loss.detach()))
        if on_eval is not None and every > 0 and step % every == 0:
            model.eval()
            on_eval(step, model)
            model.train()
    model.eval()
    return curve


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, device) -> torch.Tensor:
    """Logits ``(n, classes, S, S)`` on the CPU for ``(n, 1, S, S)`` slices, 16 at a time."""
    return torch.cat([model(chunk.to(device)).cpu() for chunk in images.split(16)])


def finetune_one(init: Dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
                 test_images: torch.Tensor, test_labels: torch.Tensor, *, seed: int, steps: int, lr: float,
                 device) -> Dict:
    """Fine-tune a whole BasicUNet from ``init`` on the labelled slices (:func:`fit`); Dice on the test slab.

    ``init`` is the U-Net's initial state (random, or random with the SAL encoder loaded), so both arms of
    a seed start from the same decoder.
    """
    torch.manual_seed(seed)
    model = pretrain_sal.build_unet(out_channels=len(CLASSES) + 1).to(device)
    model.load_state_dict(init)
    curve = fit(model, images, labels, steps=steps, lr=lr, device=device)
    return {"dice": dice_per_class(predict(model, test_images, device), test_labels), "curve": curve}


def summarise(values: List[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


def table(results: List[Dict], ks: List[int]) -> str:
    """The Markdown table: Dice (mean ± std over seeds) per k, class and initialisation."""
    lines = ["| labelled slices k | init | runs | grey matter Dice | white matter Dice | mean Dice |",
             "|---|---|---|---|---|---|"]
    for k in ks:
        for arm in ("random", "SAL"):
            runs = [r for r in results if r["k"] == k and r["init"] == arm]
            gm = [r["dice"]["grey matter"] for r in runs]
            wm = [r["dice"]["white matter"] for r in runs]
            mean = [(a + b) / 2 for a, b in zip(gm, wm)]
            if not runs:
                continue
            lines.append(f"| {k} | {arm} | {len(runs)} | {summarise(gm)} | {summarise(wm)} | {summarise(mean)} |")
    return "\n".join(lines)


def curves_picture(results: List[Dict], ks: List[int], path: Path) -> None:
    """Fine-tuning loss per step, mean over seeds, one panel per k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ks), figsize=(4 * len(ks), 3.2), squeeze=False)
    for ax, k in zip(axes[0], ks):
        for arm, style in (("random", "-"), ("SAL", "--")):
            curves = np.array([r["curve"] for r in results if r["k"] == k and r["init"] == arm])
            ax.plot(curves.mean(0), style, label=f"{arm} init")
        ax.set_title(f"k = {k}"), ax.set_xlabel("step"), ax.set_yscale("log"), ax.legend()
    axes[0, 0].set_ylabel("Dice + CE loss (train)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", type=Path, default=SAMPLE_IMAGE, help="the labelled volume (default: the sample)")
    p.add_argument("--label", type=Path, default=SAMPLE_LABEL, help="its label map: 0 background, 1 GM, 2 WM")
    p.add_argument("--checkpoint", type=Path, help="a pretrain_sal.py checkpoint (default: pre-train here)")
    p.add_argument("--k", type=int, nargs="+", default=[1, 3, 10], help="labelled slices per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps per run")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--pretrain-slab", type=float, nargs=2, default=[0.0, 0.55])
    p.add_argument("--train-slab", type=float, nargs=2, default=[0.30, 0.55])
    p.add_argument("--test-slab", type=float, nargs=2, default=[0.65, 0.85])
    p.add_argument("--pretrain-epochs", type=int, default=8)
    p.add_argument("--pretrain-args", default="", help="extra flags for pretrain_sal.py, e.g. '--window 7'")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("outputs/finetune"))
    p.add_argument("--smoke", action="store_true", help="one tiny run per arm (for tests)")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.k, args.seeds, args.steps, args.size, args.pretrain_epochs = [1], [0], 3, 32, 1
    if max(args.train_slab) >= min(args.test_slab) or max(args.pretrain_slab) >= min(args.test_slab):
        raise SystemExit("--test-slab must lie above --train-slab and --pretrain-slab (no slice leakage)")
    device = pretrain_sal.pick_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)

    if args.checkpoint is None:  # pre-train on the unlabelled slices below the test slab
        flags = ["--data", str(args.image), "--size", str(args.size), "--epochs", str(args.pretrain_epochs),
                 "--slab", *map(str, args.pretrain_slab), "--out", str(args.out), "--device", args.device,
                 *args.pretrain_args.split()] + (["--smoke"] if args.smoke else [])
        print("pre-training: python examples/pretrain_sal.py " + " ".join(flags))
        pretrain_sal.main(flags)
        args.checkpoint = args.out / "sal_pretrain.pt"
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    if checkpoint["args"]["size"] != args.size:
        raise SystemExit(f"the checkpoint was pre-trained at --size {checkpoint['args']['size']}, not {args.size}")
    sal_encoder = encoder_state(checkpoint)

    stack = load_slices(args.image, label_path=args.label, size=args.size)
    train_pool, test = slab_indices(stack, args.train_slab), slab_indices(stack, args.test_slab)
    if len(train_pool) < max(args.k):
        raise SystemExit(f"--train-slab holds {len(train_pool)} slices, fewer than k = {max(args.k)}")
    test_images = torch.from_numpy(stack.images[test]).unsqueeze(1)
    test_labels = torch.from_numpy(stack.labels[test])
    print(f"fine-tuning: train slab slices {train_pool[0]}-{train_pool[-1]}, test slab slices "
          f"{test[0]}-{test[-1]} of {stack.num_slices}; k = {args.k}; seeds {args.seeds}; {args.steps} steps")

    results = []
    for seed in args.seeds:
        for k in args.k:
            rng = np.random.default_rng(seed)
            chosen = np.sort(rng.choice(train_pool, size=k, replace=False))
            images = torch.from_numpy(stack.images[chosen]).unsqueeze(1)
            labels = torch.from_numpy(stack.labels[chosen])
            torch.manual_seed(1000 + seed)  # the random init of this seed, shared by both arms
            random_init = pretrain_sal.build_unet(out_channels=len(CLASSES) + 1).state_dict()
            sal_init = {**random_init, **sal_encoder}
            for arm, init in (("random", random_init), ("SAL", sal_init)):
                start = time.perf_counter()
                run = finetune_one(init, images, labels, test_images, test_labels, seed=seed,
                                   steps=args.steps, lr=args.lr, device=device)
                run.update(seed=seed, k=k, init=arm, slices=chosen.tolist(), seconds=time.perf_counter() - start)
                results.append(run)
                print(f"seed {seed} k {k:>2} {arm:>6} init: Dice GM {run['dice']['grey matter']:.3f} "
                      f"WM {run['dice']['white matter']:.3f}  (slices {chosen.tolist()}, {run['seconds']:.0f} s)")

    markdown = table(results, args.k)
    print("\nDice on the test slab, mean ± std over seeds " + ", ".join(map(str, args.seeds)) + ":\n" + markdown)
    (args.out / "finetune_results.json").write_text(json.dumps(
        {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
         "pretrain_history": checkpoint["history"], "pretrain_matches": checkpoint.get("matches"),
         "runs": results, "table": markdown}, indent=1))
    curves_picture(results, args.k, args.out / "finetune_curves.png")
    print(f"wrote {args.out / 'finetune_results.json'}, {args.out / 'finetune_curves.png'}")


if __name__ == "__main__":
    main()
