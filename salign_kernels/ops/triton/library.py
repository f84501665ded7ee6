"""The Triton kernels as PyTorch ops: ``torch.ops.salign_triton.*``.

All three are ``torch.library`` custom ops with fake (shape-only) implementations, so ``torch.compile``
traces a training step through them without a graph break, and the forward is differentiable
through the backward op (``register_match_autograd``, ``register_symmetric_autograd``). They
implement the pixel-major op contract of :mod:`salign_kernels.ops._common`:

``match_forward(xa, xb, mask_a, mask_b, window, mode, normalize) -> (values, indices)``
    ``s(p, q) = scale_a[p] * scale_b[q] * <xa_p, xb_q>``; ``values[p] = max`` over the candidates,
    ``indices[p]`` the lowest q attaining it, ``-1`` / ``0`` for an invalid query.
``match_symmetric_forward(xa, xb, mask_a, mask_b, normalize)``
``-> (values_ab, indices_ab, values_ba, indices_ba)``
    Dense matching in both directions from one pass over the similarity tiles (b -> a: queries in
    b, candidates in a, masks swapped).
``match_backward(grad_values, xa, xb, indices, normalize) -> (grad_xa, grad_xb)``
    The gather/scatter through ``indices``, the normalisation's gradient included.

Shapes: ``xa``, ``xb`` (B, H, W, C) in their own dtype, H and W flattening to one axis (e.g. the
pixel-major view of a contiguous (B, C, H, W) tensor); masks, values, indices (B, H, W). The ops
run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._common import (
    WINDOW_MODES,
    backward_shapes,
    register_match_autograd,
    register_symmetric_autograd,
    shape_values,
)
from . import backward as _backward
from . import dense as _dense
from . import window as _window
from ._runtime import check_backward, check_forward
from .prepare import prepare_features

NAMESPACE = "salign_triton"

#: Whether the kernels run in Triton's interpreter (CPU tensors) rather than compiled for a GPU.
INTERPRETED = _dense.INTERPRETED
symmetric_partial_bytes = _dense.symmetric_partial_bytes


def _check_device(xa: torch.Tensor) -> None:
    if xa.device.type == "cuda" or (INTERPRETED and xa.device.type == "cpu"):
        return
    hint = "" if INTERPRETED else " (CPU tensors need TRITON_INTERPRET=1 before salign_kernels is imported)"
    raise ValueError(f"{NAMESPACE}: the Triton kernels do not run on {xa.device.type} tensors{hint}")


def _checked_rows_and_scales(xa, xb, mask_a, mask_b, window, mode, normalize):
    """A forward op's inputs checked, then each map's pixel-major rows and scales (one pass each)."""
    check_forward(xa, xb, mask_a, mask_b, window, mode)
    _check_device(xa)
    xa, scale_a, _ = prepare_features(xa, normalize, rows=True)
    xb, scale_b, _ = prepare_features(xb, normalize, rows=True)
    return xa, xb, scale_a, scale_b


@torch.library.custom_op(f"{NAMESPACE}::match_forward", mutates_args=())
def match_forward(
    xa: torch.Tensor,
    xb: torch.Tensor,
    mask_a: Optional[torch.Tensor],
    mask_b: Optional[torch.Tensor],
    window: int,
    mode: int,
    normalize: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Best candidate of every query: dense (``window == 0``) or windowed. See the module docstring."""
    xa, xb, scale_a, scale_b = _checked_rows_and_scales(xa, xb, mask_a, mask_b, window, mode, normalize)
    if window == 0:
        return _dense.dense_match_forward(xa, xb, scale_a, scale_b, mask_a, mask_b)
    return _window.window_match_forward(xa, xb, scale_a, scale_b, mask_a, mask_b, window, mode)


@match_forward.register_fake
def _match_forward_fake(xa, xb, mask_a, mask_b, window, mode, normalize):
    return shape_values(xa)


@torch.library.custom_op(f"{NAMESPACE}::match_symmetric_forward", mutates_args=())
def match_symmetric_forward(
    xa: torch.Tensor,
    xb: torch.Tensor,
    mask_a: Optional[torch.Tensor],
    mask_b: Optional[torch.Tensor],
    normalize: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense matching a -> b and b -> a from one pass. See the module docstring."""
    xa, xb, scale_a, scale_b = _checked_rows_and_scales(xa, xb, mask_a, mask_b, 0, WINDOW_MODES["sliding"], normalize)
    return _dense.dense_match_symmetric_forward(xa, xb, scale_a, scale_b, mask_a, mask_b)


@match_symmetric_forward.register_fake
def _match_symmetric_forward_fake(xa, xb, mask_a, mask_b, normalize):
    return (*shape_values(xa), *shape_values(xb))


@torch.library.custom_op(f"{NAMESPACE}::match_backward", mutates_args=())
def match_backward(
    grad_values: torch.Tensor,
    xa: torch.Tensor,
    xb: torch.Tensor,
    indices: torch.Tensor,
    normalize: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``sum(grad_values * values)`` w.r.t. ``xa`` and ``xb``, normalisation included."""
    check_backward(grad_values, xa, xb, indices)
    _check_device(xa)
    return _backward.match_backward(grad_values, xa, xb, indices, normalize)


@match_backward.register_fake
def _match_backward_fake(grad_values, xa, xb, indices, normalize):
    return backward_shapes(xa, xb)


register_match_autograd(match_forward, torch.ops.salign_triton.match_backward)
register_symmetric_autograd(match_symmetric_forward, torch.ops.salign_triton.match_backward)

__all__ = [
    "match_forward", "match_symmetric_forward", "match_backward", "symmetric_partial_bytes", "INTERPRETED",
]
