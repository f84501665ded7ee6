"""The functional API: validate, choose a backend, match, reduce.

Notation (shared with the docs): features ``(B, C, H, W)``; pixels flattened row-major,
``p = h * W + w``, ``N = H * W``; ``x_p`` is pixel p's C-vector, L2-normalised when ``normalize=True``;
``s(p, q) = <xa_p, xb_q>``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _backend, reference
from ._validation import (
    REDUCTIONS,
    check_bool,
    check_choice,
    check_match_inputs,
    check_positional,
)


def dense_match(
    feat_a: torch.Tensor,
    feat_b: torch.Tensor,
    *,
    mask_a: Optional[torch.Tensor] = None,
    mask_b: Optional[torch.Tensor] = None,
    normalize: bool = True,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """For every pixel of ``feat_a``, its most similar pixel anywhere in ``feat_b``.

    ``value[p] = max_q s(p, q)`` and ``index[p]`` = the smallest ``q`` attaining it, over the
    candidates ``q`` with ``mask_b[q]`` True. A query with ``mask_a[p]`` False, or with no candidate
    left, gets ``index = -1`` and ``value = 0``. No backend but the reference builds the N x N matrix.

    Args:
        feat_a, feat_b: ``(B, C, H, W)`` features of two slices; same shape, dtype and device.
        mask_a, mask_b: optional bool ``(B, H, W)``; False removes a pixel as query and candidate.
        normalize: L2-normalise each pixel (``x / max(||x||, 1e-12)``), making ``s`` a cosine.
        backend: ``"auto"`` (fastest available for the device), ``"reference"``, ``"cpp"``, ``"triton"``.

    Returns:
        ``(values, indices)``, each ``(B, H, W)``. ``values`` are float32 (float64 for float64 input)
        and differentiable: ``d value[p] / d xa_p = xb_index[p]``, ``d value[p] / d xb_index[p] = xa_p``.
        ``indices`` are int64 flat indices into ``feat_b``'s ``H * W`` pixels, without gradient.

    Raises:
        TypeError: a non-tensor, a non-floating dtype, dtypes that differ, a mask that is not bool.
        ValueError: wrong rank, shapes or devices that differ, an empty tensor, a mask of the wrong
            shape, an unknown or unavailable ``backend``.

    Example:
        >>> values, indices = dense_match(torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8))
        >>> values.shape, indices.dtype
        (torch.Size([2, 8, 8]), torch.int64)
    """
    check_match_inputs(feat_a, feat_b, mask_a, mask_b, normalize)
    impl = _backend.select(backend, feat_a.device)
    return impl.match(feat_a, feat_b, None, "sliding", mask_a, mask_b, normalize)


def window_match(
    feat_a: torch.Tensor,
    feat_b: torch.Tensor,
    window: int,
    *,
    mode: str = "sliding",
    mask_a: Optional[torch.Tensor] = None,
    mask_b: Optional[torch.Tensor] = None,
    normalize: bool = True,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`dense_match`, with candidates restricted to a window around the query.

    - ``mode="sliding"``: the ``window x window`` neighbourhood centred on the query's (h, w) in
      ``feat_b`` (``window`` odd); positions outside the map are skipped, not padded.
    - ``mode="partition"``: the maps are tiled into ``window x window`` tiles from (0, 0), smaller at
      the bottom and right edges; the candidates are the pixels of the query's tile.

    ``window`` must be an int with ``1 <= window <= max(H, W)``. Returns and raises as
    :func:`dense_match`, plus ``ValueError`` for a bad ``window`` or ``mode``.
    Memory of the compiled backends: O(B N C); the reference unfolds O(B N C window^2).

    Example:
        >>> values, indices = window_match(torch.randn(1, 8, 9, 9), torch.randn(1, 8, 9, 9), 3)
    """
    check_match_inputs(feat_a, feat_b, mask_a, mask_b, normalize, window, mode)
    impl = _backend.select(backend, feat_a.device)
    return impl.match(feat_a, feat_b, window, mode, mask_a, mask_b, normalize)


def local_alignment_loss(
    feat_a: torch.Tensor,
    feat_b: torch.Tensor,
    *,
    window: Optional[int] = None,
    window_mode: str = "sliding",
    symmetric: bool = False,
    mask_a: Optional[torch.Tensor] = None,
    mask_b: Optional[torch.Tensor] = None,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """The local alignment loss (LA; WLA with a ``window``) between two feature maps.

    ``L = mean_p |1 - value[p]|`` over valid query pixels, where ``value[p]`` is the similarity of
    p's best match (:func:`dense_match`, or :func:`window_match` when ``window`` is given). For
    normalised features this is ``1 - cos``: the loss pulls each pixel toward its nearest
    neighbour in the other slice.

    Args:
        window, window_mode: ``None`` for dense matching, else the window of :func:`window_match`.
        symmetric: also match ``b -> a`` (masks swapped) and average the two directions.
        reduction: ``"mean"`` over valid pixels (per direction, then averaged; 0 when none is
            valid), ``"sum"`` (per direction, then averaged), or ``"none"``.
        Others: as :func:`dense_match`.

    Returns:
        A scalar for ``"mean"``/``"sum"``; ``(B, H, W)`` for ``"none"`` (``(B, 2, H, W)`` when
        symmetric, channel 0 is a -> b), 0 at invalid pixels. float32 (float64 for float64 input).

    Example:
        >>> feat_a = torch.randn(2, 32, 16, 16, requires_grad=True)
        >>> loss = local_alignment_loss(feat_a, torch.randn(2, 32, 16, 16), window=7)
        >>> loss.backward()
    """
    check_match_inputs(feat_a, feat_b, mask_a, mask_b, normalize, window, window_mode)
    check_bool(symmetric, "symmetric")
    check_choice(reduction, "reduction", REDUCTIONS)
    impl = _backend.select(backend, feat_a.device)
    directions = _backend.match_directions(
        impl, feat_a, feat_b, window, window_mode, mask_a, mask_b, normalize, symmetric
    )
    return reference.alignment_loss(directions, reduction)


def global_positional_loss(
    pred: torch.Tensor, pos_a: torch.Tensor, pos_b: torch.Tensor, *, reduction: str = "mean"
) -> torch.Tensor:
    """The global positional loss: L1 between a predicted and the true signed slice offset.

    ``L = |pred - (pos_b - pos_a)|`` with positions ``slice_index / (D - 1)`` in [0, 1]. The offset's
    sign makes the task unsolvable by constant features, which keeps the LA loss from collapsing.

    Shape: ``pred``, ``pos_a``, ``pos_b``: ``(B,)``; the result is a scalar, or ``(B,)`` for ``"none"``.

    Example:
        >>> global_positional_loss(torch.tensor([0.5]), torch.tensor([0.25]), torch.tensor([0.75]))
        tensor(0.)
    """
    check_positional(pred, pos_a, pos_b)
    check_choice(reduction, "reduction", REDUCTIONS)
    return reference.global_positional_loss(pred, pos_a, pos_b, reduction)
