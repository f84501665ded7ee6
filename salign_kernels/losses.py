"""``nn.Module`` losses in MONAI's style: options checked in ``__init__``, tensors in ``forward``."""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn

from ._numerics import accumulation_dtype
from ._backend import BACKEND_NAMES
from ._validation import (
    REDUCTIONS,
    check_bool,
    check_choice,
    check_features,
    check_window_option,
)
from .functional import Window, global_positional_loss, local_alignment_loss


_UNKNOWN = object()


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
        window: ``None`` (dense matching), the window size, or one size per spatial axis; odd in
            sliding mode.
        window_mode: ``"sliding"`` or ``"partition"``.
        symmetric: average the a -> b and b -> a directions.
        normalize: use cosine similarities.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"triton"``.

    Shape:
        ``feat_a``, ``feat_b``: ``(B, C, H, W)`` or ``(B, C, D, H, W)``; ``mask_a``, ``mask_b``:
        bool ``(B, *spatial)``.

    Example:
        >>> criterion = LocalAlignmentLoss(window=7, symmetric=True)
        >>> loss = criterion(encoder(slice_a), encoder(slice_b))
    """

    def __init__(
        self,
        window: Optional[Window] = None,
        window_mode: str = "sliding",
        symmetric: bool = False,
        normalize: bool = True,
        reduction: str = "mean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_window_option(window, window_mode)
        window = tuple(window) if isinstance(window, list) else window
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
        """The local alignment loss of two feature maps.

        Args:
            feat_a: floating ``(B, C, H, W)`` or ``(B, C, D, H, W)``: the queries' features.
            feat_b: the candidates' features, the same shape, dtype and device as ``feat_a``.
            mask_a: optional bool ``(B, *spatial)`` on the feature grid (not the image's: see
                :func:`salign_kernels.feature_mask`); a False pixel of a is not a query.
            mask_b: optional bool ``(B, *spatial)``; a False pixel of b is never a match.

        Returns:
            float32 (float64 for float64 features): a scalar for ``"mean"`` / ``"sum"``; for
            ``"none"``, ``(B, *spatial)``, or ``(B, 2, *spatial)`` when symmetric (0 at invalid pixels).
        """
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
    """Predicts the signed offset ``pos_b - pos_a`` from two feature maps.

    ``pred = MLP([GAP(feat_a), GAP(feat_b)])`` with ``GAP`` the global average over every spatial
    axis and ``MLP = Linear(2C, hidden) -> ReLU -> Linear(hidden, out_features)``.

    Args:
        in_channels: C, the channels of the features.
        hidden: width of the hidden layer.
        out_features: the number of position coordinates: 1 for a slice's position in its volume,
            K for K coordinates (e.g. 3 for a sub-volume's normalised centre).

    Shape:
        ``feat_a``, ``feat_b``: ``(B, in_channels, *spatial)`` (2D or 3D) -> ``(B,)`` when
        ``out_features == 1``, else ``(B, out_features)``.
    """

    def __init__(self, in_channels: int, hidden: int = 256, out_features: int = 1) -> None:
        super().__init__()
        _check_positive_int(in_channels, "in_channels")
        _check_positive_int(hidden, "hidden")
        _check_positive_int(out_features, "out_features")
        self.in_channels, self.out_features = in_channels, out_features
        self.mlp = nn.Sequential(nn.Linear(2 * in_channels, hidden), nn.ReLU(), nn.Linear(hidden, out_features))

    def forward(self, feat_a: torch.Tensor, feat_b: torch.Tensor) -> torch.Tensor:
        """The predicted offset ``pos_b - pos_a`` of two feature maps.

        Args:
            feat_a: floating ``(B, in_channels, H, W)`` or ``(B, in_channels, D, H, W)``.
            feat_b: the same shape, dtype and device as ``feat_a``.

        Returns:
            ``(B,)`` when ``out_features == 1``, else ``(B, out_features)``, in the head's dtype
            (float32 unless converted).
        """
        check_features(feat_a, feat_b)
        if feat_a.shape[1] != self.in_channels:
            raise ValueError(
                f"feat_a must have in_channels={self.in_channels} channels; got shape {tuple(feat_a.shape)}"
            )
        spatial = tuple(range(2, feat_a.dim()))
        pooled = torch.cat([feat_a.mean(dim=spatial), feat_b.mean(dim=spatial)], dim=1)  # (B, 2C)
        # In the head's own dtype (float32 unless converted), whatever the features' (half, bfloat16,
        # float64); under autocast, nn.Linear casts as autocast says.
        pred = self.mlp(pooled.to(self.mlp[0].weight.dtype))
        return pred.squeeze(1) if self.out_features == 1 else pred


class SALossOutput(NamedTuple):
    """``total = local + gp_weight * positional``; each a scalar tensor."""

    total: torch.Tensor
    local: torch.Tensor
    positional: torch.Tensor


class SALoss(nn.Module):
    """The self-supervised alignment objective: ``L = L_LA (or L_WLA) + gp_weight * L_GP``.

    Holds a :class:`GlobalPositionalHead` and a :class:`LocalAlignmentLoss`. The head has
    parameters, so this loss trains: its parameters must go to the optimizer with the encoder's
    (left out, the head never learns and the positional loss stops regularising), and under
    ``DistributedDataParallel`` the loss must sit inside the wrapped module with the encoder
    (outside it, each process's head drifts its own way). :class:`salign_kernels.SALModel` holds
    both, so one ``DistributedDataParallel(model)`` and one ``optimizer(model.parameters())`` cover
    everything. In training mode under a process group of more than one process, an eager forward
    outside a DDP forward that holds this loss warns once (a :class:`RuntimeWarning`).

    Args:
        in_channels: channels of the features (for the positional head).
        window, window_mode, symmetric, normalize, backend: as :class:`LocalAlignmentLoss`.
        gp_weight: weight of the global positional loss, >= 0.
        hidden: width of the positional head's hidden layer.
        pos_dims: coordinates per position: 1 for slice positions ``(B,)``, K for ``(B, K)``
            positions (3 for the centres of sub-volume pairs).
        reduction: ``"mean"`` or ``"sum"``, applied to both parts.

    Shape:
        ``feat_a``, ``feat_b``: ``(B, C, H, W)`` or ``(B, C, D, H, W)``; ``pos_a``, ``pos_b``:
        ``(B,)`` slice positions in [0, 1] (``(B, pos_dims)`` when ``pos_dims > 1``);
        ``mask_a``, ``mask_b``: optional bool ``(B, *spatial)``.

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
        window: Optional[Window] = None,
        window_mode: str = "sliding",
        symmetric: bool = False,
        normalize: bool = True,
        gp_weight: float = 1.0,
        hidden: int = 256,
        pos_dims: int = 1,
        reduction: str = "mean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(gp_weight, bool) or not isinstance(gp_weight, (int, float)):
            raise TypeError(f"gp_weight must be a float; got {gp_weight!r} ({type(gp_weight).__name__})")
        if not (math.isfinite(gp_weight) and gp_weight >= 0):  # rejects NaN and infinities too
            raise ValueError(f"gp_weight must be a finite number >= 0; got {gp_weight}")
        check_choice(reduction, "reduction", ("mean", "sum"))
        _check_positive_int(pos_dims, "pos_dims")
        self.gp_weight = float(gp_weight)
        self.local_loss = LocalAlignmentLoss(window, window_mode, symmetric, normalize, reduction, backend)
        self.head = GlobalPositionalHead(in_channels, hidden, pos_dims)
        self._warned_outside_ddp = False

    def _check_distributed_use(self) -> None:
        """Warn once when training under several processes outside a ``DistributedDataParallel``.

        DDP marks the module whose forward it is running in the class attribute
        ``DistributedDataParallel._active_ddp_module`` (set and restored around every forward by
        its C++ reducer path). That module must hold this loss: one holding only the encoder
        still leaves the head's gradients un-reduced. Skipped while torch.compile traces (a
        warning there would break the graph), so a compiled forward never warns. DDP's Python
        reducer (an option of compiled autograd) runs its forward without the marker: there the
        warning is a false alarm, to be filtered.
        """
        if self._warned_outside_ddp or not self.training or torch.compiler.is_compiling():
            return
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        ddp = getattr(nn.parallel.DistributedDataParallel, "_active_ddp_module", _UNKNOWN)
        if ddp is _UNKNOWN:  # a torch without the marker: no reliable way to tell
            return
        if ddp is not None and any(module is self for module in ddp.module.modules()):
            return
        self._warned_outside_ddp = True
        warnings.warn(
            "SALoss runs in training mode under a process group of "
            f"{dist.get_world_size()} processes outside DistributedDataParallel (or inside one that "
            "does not hold it): its positional "
            "head's gradients are not averaged and the heads drift apart across processes. Wrap the "
            "encoder and the loss together, DistributedDataParallel(SALModel(encoder, criterion)), "
            "and optimise model.parameters().",
            RuntimeWarning,
            stacklevel=3,
        )

    def forward(
        self,
        feat_a: torch.Tensor,
        feat_b: torch.Tensor,
        pos_a: torch.Tensor,
        pos_b: torch.Tensor,
        mask_a: Optional[torch.Tensor] = None,
        mask_b: Optional[torch.Tensor] = None,
    ) -> SALossOutput:
        """The SAL objective of two feature maps and their positions.

        Args:
            feat_a: floating ``(B, in_channels, H, W)`` or ``(B, in_channels, D, H, W)``: the
                features of the first slice (sub-volume) of each pair.
            feat_b: the second's, the same shape, dtype and device as ``feat_a``.
            pos_a: floating ``(B,)`` positions in [0, 1] (``(B, pos_dims)`` when ``pos_dims > 1``).
            pos_b: the same shape as ``pos_a``; the head predicts ``pos_b - pos_a``.
            mask_a: optional bool ``(B, *spatial)`` on the feature grid (bring an image-resolution
                mask there with :func:`salign_kernels.feature_mask`); False pixels are not matched.
            mask_b: optional bool ``(B, *spatial)``, the same for ``feat_b``.

        Returns:
            :class:`SALossOutput` ``(total, local, positional)``: scalar tensors, float32 at least;
            ``total`` is the one to backpropagate.
        """
        self._check_distributed_use()
        local = self.local_loss(feat_a, feat_b, mask_a, mask_b)
        pred = self.head(feat_a, feat_b)
        # float32 at least (a half-precision head under autocast), float64 for a float64 head.
        pred = pred.to(accumulation_dtype(pred.dtype))
        positional = global_positional_loss(pred, pos_a.to(pred.dtype), pos_b.to(pred.dtype),
                                            reduction=self.local_loss.reduction)
        total = local + self.gp_weight * positional.to(local.dtype)
        return SALossOutput(total, local, positional)
