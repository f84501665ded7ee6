"""One protocol for every method: pre-train on the unlabelled scans with the same budget (steps x
batch), transfer the encoder, fine-tune with ``examples/finetune.py``'s recipe on k labelled slices,
choose the fine-tuning step on the validation slab, and score once on the test template."""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import finetune  # noqa: E402  (fit, predict: the fine-tuning recipe)
import pretrain_sal  # noqa: E402  (build_unet, feature_spread)

from salign_kernels.data import SlicePairDataset  # noqa: E402

from .augment import ViewAugmenter  # noqa: E402
from .data import CLASSES, Split  # noqa: E402
from .methods import METHODS  # noqa: E402


@dataclass(frozen=True)
class Budget:
    """The pre-training every method gets: ``steps`` optimiser steps of ``batch`` samples (pairs or
    slices) at ``size x size``, AdamW at ``lr`` (weight decay 1e-4)."""

    steps: int
    batch: int
    size: int
    lr: float = 1e-3
    embed_dim: int = 64


def pair_dataset(volumes: Sequence[Path], budget: Budget) -> SlicePairDataset:
    """Pairs of axial slices at most 3 apart, with foreground masks (normalised intensity > 0.05)."""
    per_volume = max(1, math.ceil(budget.steps * budget.batch / len(volumes)))
    return SlicePairDataset(list(volumes), size=budget.size, max_offset=3, foreground_threshold=0.05,
                            pairs_per_volume=per_volume, seed=0)


def pretrain(name: str, dataset: SlicePairDataset, budget: Budget, seed: int, device) -> Dict:
    """Pre-train method ``name`` (a key of :data:`METHODS`) from the seed's random init.

    The pairs of seed ``s`` are the dataset's epochs ``1000 s + 1, ...``, shuffled by a generator
    seeded with ``s``: every method of a seed sees the same pairs in the same order (the baselines
    use the first slice of each pair). Returns the transferred ``encoder`` weights, the loss per
    step, the collapse monitor (feature spread and weakest channel on a fixed batch of pre-training
    slices, see ``pretrain_sal.feature_spread``) and the wall time.
    """
    make, augment = METHODS[name]
    torch.manual_seed(seed)
    method = make(budget.embed_dim).to(device)
    optimizer = torch.optim.AdamW(method.parameters(), lr=budget.lr, weight_decay=1e-4)
    augmenters = (ViewAugmenter(seed), ViewAugmenter(seed + 10_000)) if augment else None
    generator = torch.Generator().manual_seed(seed)
    curve: List[float] = []
    start = time.perf_counter()
    epoch = 1000 * seed
    while len(curve) < budget.steps:
        epoch += 1
        dataset.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_size=budget.batch, shuffle=True, drop_last=True,
                                             generator=generator)
        for batch in loader:
            if method.views == "pair":
                views = [(batch["slice_a"], batch["mask_a"]), (batch["slice_b"], batch["mask_b"])]
                pos_b = batch["pos_b"]
            else:
                views = [(batch["slice_a"], batch["mask_a"])] * 2
                pos_b = batch["pos_a"]
            if augmenters is not None:
                views = [aug(image, mask) for aug, (image, mask) in zip(augmenters, views)]
            (view_a, mask_a), (view_b, mask_b) = views
            loss = method(view_a.to(device), view_b.to(device), batch["pos_a"].to(device), pos_b.to(device),
                             mask_a[:, 0].to(device), mask_b[:, 0].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            curve.append(float(loss.detach()))
            if len(curve) == budget.steps:
                break
    seconds = time.perf_counter() - start
    monitor = collapse_monitor(method, dataset, device)
    return {"encoder": method.encoder_state(), "curve": curve, "seconds": seconds, **monitor}


@torch.no_grad()
def collapse_monitor(method, dataset: SlicePairDataset, device, count: int = 32) -> Dict[str, float]:
    """Feature spread of the dense encoder features on ``count`` fixed pre-training slices."""
    dataset.set_epoch(0)
    items = [dataset[i * len(dataset) // count] for i in range(count)]
    images = torch.stack([item["slice_a"] for item in items]).to(device)
    masks = torch.stack([item["mask_a"][0] for item in items]).to(device)
    method.eval()
    features = method.encoder(images)
    method.train()
    from salign_kernels import feature_mask

    stds = pretrain_sal.feature_spread(features, feature_mask(masks, features.shape[2:]))
    return {"spread": float(stds.pow(2).sum().sqrt()), "min_channel_std_x_sqrt_c":
            float(stds.min()) * math.sqrt(len(stds))}


def scores(logits: torch.Tensor, labels: torch.Tensor, spacing: Sequence[float]) -> Dict[str, Dict[str, float]]:
    """Dice and HD95 (mm) of each class over the whole stack (one 3D overlap).

    Shape: ``logits`` ``(D, classes, S, S)``, ``labels`` ``(D, S, S)``; ``spacing`` ``(slice, row,
    column)`` in mm. An empty prediction of a class gets HD95 = inf (MONAI's convention: nan) ->
    reported as nan.
    """
    from monai.metrics import compute_dice, compute_hausdorff_distance

    num_classes = logits.shape[1]
    pred = F.one_hot(logits.argmax(1), num_classes).permute(3, 0, 1, 2).unsqueeze(0)
    true = F.one_hot(labels, num_classes).permute(3, 0, 1, 2).unsqueeze(0)
    dice = compute_dice(pred, true, include_background=False)[0]
    hd95 = compute_hausdorff_distance(pred, true, include_background=False, percentile=95,
                                      spacing=list(spacing))[0]
    return {"dice": {CLASSES[c]: float(dice[c - 1]) for c in CLASSES},
            "hd95_mm": {CLASSES[c]: float(hd95[c - 1]) for c in CLASSES}}


def mean_dice(logits: torch.Tensor, labels: torch.Tensor) -> float:
    dice = finetune.dice_per_class(logits, labels)
    return float(np.mean([dice[name] for name in CLASSES.values()]))


def finetune_and_test(init: Dict[str, torch.Tensor], train: Split, val: Split, test: Split,
                      test_spacing: Sequence[float], *, seed: int, steps: int, lr: float, every: int,
                      device) -> Dict:
    """Fine-tune from ``init`` on ``train``; keep the state of the step with the best validation mean
    Dice (checked every ``every`` steps); score that state on ``test``."""
    torch.manual_seed(seed)
    model = pretrain_sal.build_unet(out_channels=len(CLASSES) + 1).to(device)
    model.load_state_dict(init)
    as_tensors = lambda split: (torch.from_numpy(split.images).unsqueeze(1), torch.from_numpy(split.labels))
    best = {"val_dice": -1.0, "step": 0, "state": None}
    val_curve = []

    def on_eval(step, net):
        score = mean_dice(finetune.predict(net, as_tensors(val)[0], device), as_tensors(val)[1])
        val_curve.append((step, score))
        if score > best["val_dice"]:
            best.update(val_dice=score, step=step, state=copy.deepcopy(net.state_dict()))

    start = time.perf_counter()
    images, labels = as_tensors(train)
    curve = finetune.fit(model, images, labels, steps=steps, lr=lr, device=device, every=every, on_eval=on_eval)
    model.load_state_dict(best["state"])
    test_images, test_labels = as_tensors(test)
    result = scores(finetune.predict(model, test_images, device), test_labels, test_spacing)
    return {**result, "val_dice": best["val_dice"], "best_step": best["step"], "val_curve": val_curve,
            "train_curve": curve, "seconds": time.perf_counter() - start}


def random_init(seed: int) -> Dict[str, torch.Tensor]:
    """The seed's randomly initialised U-Net: every method of a seed gets this decoder."""
    torch.manual_seed(1000 + seed)
    return pretrain_sal.build_unet(out_channels=len(CLASSES) + 1).state_dict()


def choose_slices(pool: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The k labelled slices of a seed: fixed by (seed, k), the same for every method."""
    return np.sort(np.random.default_rng([seed, k]).choice(pool, size=k, replace=False))
