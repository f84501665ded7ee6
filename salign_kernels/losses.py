"""``nn.Module`` losses in MONAI's style: options checked in ``__init__``, tensors in ``forward``."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from ._validation import (
    BACKEND_NAMES,
    REDUCTIONS,
    check_bool,
    check_choice,
    check_features,
    check_window_option,
)
from .functional import global_positional_loss, local_alignment_loss


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1; got {value}")


class LocalAlignmentLoss(nn.Module):
    """The local alignment loss (LA, or WLA with a ``window``) as a module.

    ``L = mean_p |1 - max_{q in Q(p)} <xa_p, xb_q>|`` over valid query pixels; see
    :func:`salign_kernels.local_alignment_loss` for every option.

    Args:
        window: ``None`` (dense matching) or the window size; odd in sliding mode.
        window_mode: ``"sliding"`` or ``"partition"``.
        symmetric: average the a -> b and b -> a directions.
        normalize: use cosine similarities.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"triton"``.

    Shape:
        ``feat_a``, ``feat_b``: ``(B, C, H, W)``; ``mask_a``, ``mask_b``: bool ``(B, H, W)``.

    Example:
        >>> criterion = LocalAlignmentLoss(window=7, symmetric=True)
        >>> loss = criterion(encoder(slice_a), encoder(slice_b))
    """

    def __init__(
        self,
        window: Optional[int] = None,
        window_mode: str = "sliding",
        symmetric: bool = False,
        normalize: bool = True,
        reduction: str = "mean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_window_option(window, window_mode)
        check_bool(symmetric, "symmetric")
        check_bool(normalize, "normalize")
        check_choice(reduction, "reduction", REDUCTIONS)
        check_choice(backend, "backend", BACKEND_NAMES)
        self.window, self.window_mode, self.symmetric = window, window_mode, symmetric
        self.normalize, self.reduction, self.backend = normalize, reduction, backend

    def forward(
        self,
        feat_a: torch.Tensor,
        feat_b: torch.Tensor,
        mask_a: Optional[torch.Tensor] = None,
        mask_b: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return local_alignment_loss(
            feat_a,
            feat_b,
            window=self.window,
            window_mode=self.window_mode,
            symmetric=self.symmetric,
            mask_a=mask_a,
            mask_b=mask_b,
            normalize=self.normalize,
            reduction=self.reduction,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"window={self.window}, window_mode={self.window_mode!r}, symmetric={self.symmetric}, "
            f"normalize={self.normalize}, reduction={self.reduction!r}, backend={self.backend!r}"
        )


class GlobalPositionalHead(nn.Module):
    """Predicts the signed slice offset ``pos_b - pos_a`` from two feature maps.

    ``pred = MLP([GAP(feat_a), GAP(feat_b)])`` with ``GAP`` the global average over (H, W) and
    ``MLP = Linear(2C, hidden) -> ReLU -> Linear(hidden, 1)``.

    Shape:
        ``feat_a``, ``feat_b``: ``(B, in_channels, H, W)`` -> ``(B,)``.
    """

    def __init__(self, in_channels: int, hidden: int = 256) -> None:
        super().__init__()
        _check_positive_int(in_channels, "in_channels")
        _check_positive_int(hidden, "hidden")
        self.in_channels = in_channels
        self.mlp = nn.Sequential(nn.Linear(2 * in_channels, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, feat_a: torch.Tensor, feat_b: torch.Tensor) -> torch.Tensor:
        check_features(feat_a, feat_b)
        if feat_a.shape[1] != self.in_channels:
            raise ValueError(
                f"feat_a must have in_channels={self.in_channels} channels; got shape {tuple(feat_a.shape)}"
            )
        pooled = torch.cat([feat_a.mean(dim=(2, 3)), feat_b.mean(dim=(2, 3))], dim=1)  # (B, 2C)
        return self.mlp(pooled).squeeze(1)


class SALossOutput(NamedTuple):
    """``total = local + gp_weight * positional``; each a scalar tensor."""

    total: torch.Tensor
    local: torch.Tensor
    positional: torch.Tensor


class SALoss(nn.Module):
    """The self-supervised alignment objective: ``L = L_LA (or L_WLA) + gp_weight * L_GP``.

    Holds a :class:`GlobalPositionalHead` (its parameters train with the encoder) and a
    :class:`LocalAlignmentLoss`.

    Args:
        in_channels: channels of the features (for the positional head).
        window, window_mode, symmetric, normalize, backend: as :class:`LocalAlignmentLoss`.
        gp_weight: weight of the global positional loss, >= 0.
        hidden: width of the positional head's hidden layer.
        reduction: ``"mean"`` or ``"sum"``, applied to both parts.

    Shape:
        ``feat_a``, ``feat_b``: ``(B, C, H, W)``; ``pos_a``, ``pos_b``: ``(B,)`` slice positions in
        [0, 1]; ``mask_a``, ``mask_b``: optional bool ``(B, H, W)``.

    Returns:
        :class:`SALossOutput` ``(total, local, positional)``.

    Example:
        >>> criterion = SALoss(in_channels=64, window=7)
        >>> out = criterion(feat_a, feat_b, pos_a, pos_b)
        >>> out.total.backward()
    """

    def __init__(
        self,
        in_channels: int,
        *,
        window: Optional[int] = None,
        window_mode: str = "sliding",
        symmetric: bool = False,
        normalize: bool = True,
        gp_weight: float = 1.0,
        hidden: int = 256,
        reduction: str = "mean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(gp_weight, bool) or not isinstance(gp_weight, (int, float)):
            raise TypeError(f"gp_weight must be a float; got {gp_weight!r} ({type(gp_weight).__name__})")
        if not gp_weight >= 0:  # also rejects NaN
            raise ValueError(f"gp_weight must be >= 0; got {gp_weight}")
        check_choice(reduction, "reduction", ("mean", "sum"))
        self.gp_weight = float(gp_weight)
        self.local_loss = LocalAlignmentLoss(window, window_mode, symmetric, normalize, reduction, backend)
        self.head = GlobalPositionalHead(in_channels, hidden)

    def forward(
        self,
        feat_a: torch.Tensor,
        feat_b: torch.Tensor,
        pos_a: torch.Tensor,
        pos_b: torch.Tensor,
        mask_a: Optional[torch.Tensor] = None,
        mask_b: Optional[torch.Tensor] = None,
    ) -> SALossOutput:
        local = self.local_loss(feat_a, feat_b, mask_a, mask_b)
        pred = self.head(feat_a, feat_b)
        positional = global_positional_loss(pred.float(), pos_a, pos_b, reduction=self.local_loss.reduction)
        return SALossOutput(local + self.gp_weight * positional.to(local.dtype), local, positional)
