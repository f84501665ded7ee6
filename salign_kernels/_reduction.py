"""The losses from the matches: every backend shares these reductions, backends differ only in how
they match.

Per query voxel ``l_p = |1 - value[p]|`` over the valid queries (index >= 0), 0 elsewhere.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

Match = Tuple[torch.Tensor, torch.Tensor]


def alignment_loss(directions: Sequence[Match], reduction: str = "mean") -> torch.Tensor:
    """The LA/WLA loss from the matches of one or two directions (a -> b, then b -> a).

    ``"mean"`` divides each direction's sum by its number of valid queries (0 when there is none),
    ``"sum"`` keeps the sum; two directions are averaged. ``"none"`` returns ``(B, *spatial)``, or
    ``(B, 2, *spatial)`` for two directions (channel 0 is a -> b).
    """
    per_voxel = [torch.where(idx >= 0, (1.0 - val).abs(), 0.0) for val, idx in directions]
    if reduction == "none":
        return per_voxel[0] if len(per_voxel) == 1 else torch.stack(per_voxel, dim=1)
    if reduction == "sum":
        totals = [loss.sum() for loss in per_voxel]
    else:  # "mean"; the clamp keeps an all-masked batch at 0 without a host sync
        totals = [
            loss.sum() / (idx >= 0).sum().clamp_min(1).to(loss.dtype)
            for loss, (_, idx) in zip(per_voxel, directions)
        ]
    return totals[0] if len(totals) == 1 else (totals[0] + totals[1]) / 2


def positional_loss(pred: torch.Tensor, pos_a: torch.Tensor, pos_b: torch.Tensor, reduction: str = "mean"):
    """L1 between the predicted signed offset and the true one: ``|pred - (pos_b - pos_a)|``.

    ``(B,)`` or ``(B, K)``; ``"mean"`` averages over batch and coordinates.
    """
    return F.l1_loss(pred, (pos_b - pos_a).to(pred.dtype), reduction=reduction)
