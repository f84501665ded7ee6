"""The functional API: validate, choose a backend, match, reduce.

Notation (shared with the docs): features ``(B, C, H, W)`` (2D slices) or ``(B, C, D, H, W)``
(3D sub-volumes), ``spatial`` their trailing axes; voxels (pixels in 2D) flattened row-major,
``p = (d * H + h) * W + w`` (``p = h * W + w`` in 2D), ``N = D * H * W``; ``x_p`` is voxel p's
C-vector, L2-normalised when ``normalize=True``; ``s(p, q) = <xa_p, xb_q>``.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from . import _backend
from ._reduction import positional_loss
from ._validation import (
    REDUCTIONS,
    check_bool,
    check_choice,
    check_match_inputs,
    check_positional,
)

Window = Union[int, Tuple[int, ...]]


def dense_match(
    feat_a: torch.Tensor,
    feat_b: torch.Tensor,
    *,
    mask_a: Optional[torch.Tensor] = None,
    mask_b: Optional[torch.Tensor] = None,
    normalize: bool = True,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """For every voxel of ``feat_a``, its most similar voxel anywhere in ``feat_b``.

    ``value[p] = max_q s(p, q)`` and ``index[p]`` = the smallest flat ``q`` attaining it, over the
    candidates ``q`` with ``mask_b[q]`` True. A query with ``mask_a[p]`` False, or with no candidate
    left, gets ``index = -1`` and ``value = 0``. No backend but the reference builds the N x N matrix.

    Args:
        feat_a, feat_b: ``(B, C, H, W)`` features of two slices or ``(B, C, D, H, W)`` features of
            two sub-volumes; same shape, dtype and device.
        mask_a, mask_b: optional bool ``(B, *spatial)``; False removes a voxel as query and candidate.
        normalize: L2-normalise each voxel (``x / max(||x||, 1e-12)``), making ``s`` a cosine.
        backend: ``"auto"`` (fastest available for the device), ``"reference"``, ``"cpp"``, ``"triton"``.

    Returns:
        ``(values, indices)``, each ``(B, *spatial)``. ``values`` are float32 (float64 for float64
        input) and differentiable: ``d value[p] / d xa_p = xb_index[p]``,
        ``d value[p] / d xb_index[p] = xa_p``. ``indices`` are int64 flat indices into ``feat_b``'s
        ``N`` voxels, without gradient.

    Raises:
        TypeError: a non-tensor, a non-floating dtype, dtypes that differ, a mask that is not bool.
        ValueError: a rank other than 4 or 5, shapes or devices that differ, an empty tensor, a mask
            of the wrong shape, an unknown or unavailable ``backend``.

    Example:
        >>> values, indices = dense_match(torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8))
        >>> values.shape, indices.dtype
        (torch.Size([2, 8, 8]), torch.int64)
        >>> dense_match(torch.randn(1, 16, 4, 8, 8), torch.randn(1, 16, 4, 8, 8))[1].shape
        torch.Size([1, 4, 8, 8])
    """
    matching = check_match_inputs(feat_a, feat_b, mask_a, mask_b, normalize)
    return _backend.select(backend, feat_a, matching).match(feat_a, feat_b, matching)


def window_match(
    feat_a: torch.Tensor,
    feat_b: torch.Tensor,
    window: Window,
    *,
    mode: str = "sliding",
    mask_a: Optional[torch.Tensor] = None,
    mask_b: Optional[torch.Tensor] = None,
    normalize: bool = True,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`dense_match`, with candidates restricted to a window around the query.

    ``window`` is an int k (the same size on every spatial axis) or one size per spatial axis,
    e.g. ``(1, 7, 7)``: in-plane windows of a volume, which give exactly the per-slice 2D result.

    - ``mode="sliding"``: the neighbourhood centred on the query's position in ``feat_b`` (every
      size odd); positions outside the map are skipped, not padded.
    - ``mode="partition"``: the maps are tiled with ``window``-sized tiles from the origin, smaller at
      the far edges (sizes may be even); the candidates are the voxels of the query's tile.

    Each size must be at least 1 and at most the largest spatial size. Returns and raises as
    :func:`dense_match`, plus ``TypeError``/``ValueError`` for a bad ``window`` (None included:
    dense matching is :func:`dense_match`) or ``mode``.
    Memory of the compiled backends: O(B N C); the reference unfolds O(B N C prod(window)).

    Example:
        >>> values, indices = window_match(torch.randn(1, 8, 9, 9), torch.randn(1, 8, 9, 9), 3)
        >>> volume_a, volume_b = torch.randn(1, 8, 4, 9, 9), torch.randn(1, 8, 4, 9, 9)
        >>> values, indices = window_match(volume_a, volume_b, (3, 5, 5))
    """
    if window is None:
        raise ValueError("window must be an int or a tuple of ints for window_match; got None "
                         "(dense_match matches against every voxel)")
    matching = check_match_inputs(feat_a, feat_b, mask_a, mask_b, normalize, window, mode)
    return _backend.select(backend, feat_a, matching).match(feat_a, feat_b, matching)


def local_alignment_loss(
    feat_a: torch.Tensor,
    feat_b: torch.Tensor,
    *,
    window: Optional[Window] = None,
    window_mode: str = "sliding",
    symmetric: bool = False,
    mask_a: Optional[torch.Tensor] = None,
    mask_b: Optional[torch.Tensor] = None,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """The local alignment loss (LA; WLA with a ``window``) between two feature maps.

    ``L = mean_p |1 - value[p]|`` over valid query voxels, where ``value[p]`` is the similarity of
    p's best match (:func:`dense_match`, or :func:`window_match` when ``window`` is given). For
    normalised features this is ``1 - cos``: the loss pulls each voxel toward its nearest
    neighbour in the other slice (or sub-volume).

    Args:
        window, window_mode: ``None`` for dense matching, else the window of :func:`window_match`.
        symmetric: also match ``b -> a`` (masks swapped) and average the two directions.
        reduction: ``"mean"`` over valid voxels (per direction, then averaged; 0 when none is
            valid), ``"sum"`` (per direction, then averaged), or ``"none"``.
        Others: as :func:`dense_match`.

    Returns:
        A scalar for ``"mean"``/``"sum"``; ``(B, *spatial)`` for ``"none"`` (``(B, 2, *spatial)``
        when symmetric, channel 0 is a -> b), 0 at invalid voxels. float32 (float64 for float64 input).

    Example:
        >>> feat_a = torch.randn(2, 32, 16, 16, requires_grad=True)
        >>> loss = local_alignment_loss(feat_a, torch.randn(2, 32, 16, 16), window=7)
        >>> loss.backward()
    """
    matching = check_match_inputs(feat_a, feat_b, mask_a, mask_b, normalize, window, window_mode)
    check_bool(symmetric, "symmetric")
    check_choice(reduction, "reduction", REDUCTIONS)
    impl = _backend.select(backend, feat_a, matching)
    return _backend.alignment_loss(impl, feat_a, feat_b, matching, symmetric, reduction)


def global_positional_loss(
    pred: torch.Tensor, pos_a: torch.Tensor, pos_b: torch.Tensor, *, reduction: str = "mean"
) -> torch.Tensor:
    """The global positional loss: L1 between a predicted and the true signed offset.

    ``L = |pred - (pos_b - pos_a)|``. For slices the positions are ``slice_index / (D - 1)`` in
    [0, 1], shape ``(B,)``; for sub-volumes ``(B, K)``, e.g. the crop centres normalised to [0, 1]
    per axis. The offset's sign makes the task unsolvable by constant features, which keeps the LA
    loss from collapsing.

    Shape: ``pred``, ``pos_a``, ``pos_b``: ``(B,)`` or ``(B, K)``; the result is a scalar (the mean
    over batch and coordinates, or their sum), or the input's shape for ``"none"``.

    Example:
        >>> global_positional_loss(torch.tensor([0.5]), torch.tensor([0.25]), torch.tensor([0.75]))
        tensor(0.)
    """
    check_positional(pred, pos_a, pos_b)
    check_choice(reduction, "reduction", REDUCTIONS)
    return positional_loss(pred, pos_a, pos_b, reduction)
