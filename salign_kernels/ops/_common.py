"""The pixel-major op contract of the Triton backend, its autograd, and the window encoding.

The C++ backend shares :func:`encode_window` only: on a CPU every pass over the features costs
memory bandwidth, so its ops take the features as they are and normalise inside the kernels (see
:mod:`salign_kernels.ops.cpu`). On a GPU those passes are cheap next to the matching, and the
pixel-major layout with separate scales keeps the kernels simple.

The op contract
---------------
The ops take pixel-major features:

``forward(xa, xb, mask_a, mask_b, window, mode, normalize) -> (values, indices)``
    ``xa``, ``xb``: ``(B, H, W, C)`` of any supported float dtype (not upcast: the kernels
    accumulate in float32, float64 for float64) whose H and W axes flatten to one pixel axis
    (:func:`pixel_strides`): the pixel-major view of a contiguous ``(B, C, H, W)`` tensor and a
    contiguous pixel-major tensor both qualify, so the public API passes either without a copy.
    ``mask_a``, ``mask_b``: optional bool ``(B, H, W)``. ``window``: 0 for dense, else the window
    size; ``mode``: :data:`WINDOW_MODES`. With ``scale = 1 / max(||x_p||, eps)`` when ``normalize``
    (else 1) the similarity is

        s(p, q) = scale_a[p] * scale_b[q] * <xa_p, xb_q>

    and ``values[p] = max s(p, q)``, ``indices[p]`` = the lowest q attaining it, over the candidate
    set of the specification; ``-1`` and ``0`` for an invalid query. NaN similarities win the max
    (as in ``torch.max``), so NaN features give NaN values.

``backward(grad_values, xa, xb, indices, normalize) -> (grad_xa, grad_xb)``
    The gradient of ``sum(grad_values * values)`` with respect to the features, normalisation
    included. With ``g_p = grad_values[p]`` for valid p (0 otherwise), ``q = indices[p]``,
    ``d_p = <xa_p, xb_q>`` and ``curv = scale**3`` where the norm exceeds ``eps`` (0 elsewhere, and
    without normalisation), from ``d scale / d x = -curv * x``:

        grad_xa[p] = g_p sa[p] sb[q] xb_q - g_p sb[q] d_p curv_a[p] xa_p                  (gather)
        grad_xb[q] = sum_{p: indices[p] = q} g_p sa[p] sb[q] xa_p
                     - (sum_{p: indices[p] = q} g_p sa[p] d_p) curv_b[q] xb_q             (scatter)

    Gradients come back in the features' dtype and strides (memory format).

The ops compute the scales themselves (the Triton backend in one pass over each map that also
writes the pixel-major rows its kernels gather from; :func:`pixel_scales` is the same in PyTorch),
so a training step runs no PyTorch pass over the features: no layout copy, no autograd chain
through the normalisation.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._dtypes import accumulation_dtype
from ..reference import NORMALIZE_EPS

#: Integer codes of the window modes in the ops' schema.
WINDOW_MODES = {"sliding": 0, "partition": 1}


def pixel_strides(x: torch.Tensor):
    """``(batch, pixel, channel)`` strides of a ``(B, H, W, C)`` tensor whose H and W axes flatten to
    one pixel axis (``x.stride(1) == W * x.stride(2)``), or None if they do not.

    The kernels address channel ``c`` of pixel ``p`` of sample ``b`` at ``b * sB + p * sP + c * sC``:
    a contiguous pixel-major tensor (``sC == 1``) and the pixel-major view of a contiguous
    ``(B, C, H, W)`` one (``sP == 1``) both qualify.
    """
    _, H, W, _ = x.shape
    if H == 1:
        pixel = x.stride(2)
    elif W == 1:
        pixel = x.stride(1)
    elif x.stride(1) == W * x.stride(2):
        pixel = x.stride(2)
    else:
        return None
    return x.stride(0), pixel, x.stride(3)


def pixel_major(feat: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W) -> (B, H, W, C)``: a view when H and W flatten to one axis (contiguous and
    channels-last tensors, the usual cases), else a copy. Differentiable.
    """
    view = feat.permute(0, 2, 3, 1)
    return view if pixel_strides(view) is not None else view.contiguous()


def _norms(pixels: torch.Tensor) -> torch.Tensor:
    with torch.autocast(pixels.device.type, enabled=False):  # half inputs still get float32 norms
        return torch.linalg.vector_norm(pixels, dim=-1, dtype=accumulation_dtype(pixels.dtype))


def pixel_scales(pixels: torch.Tensor, normalize: bool) -> torch.Tensor:
    """``(B, H, W, C) -> (B, H, W)`` contiguous: ``1 / max(||x_p||, eps)`` when normalising, else ones.

    In the accumulation dtype (float32, float64 for float64).
    """
    if not normalize:
        return torch.ones(pixels.shape[:3], dtype=accumulation_dtype(pixels.dtype), device=pixels.device)
    return _norms(pixels).clamp_min(NORMALIZE_EPS).reciprocal().contiguous()


def encode_window(window: Optional[int], mode: str):
    """``(window, mode)`` as the ops take them: 0 means dense."""
    return (0 if window is None else int(window)), WINDOW_MODES[mode]


def op_arguments(feat_a, feat_b, window, mode, mask_a, mask_b, normalize):
    """The forward op's arguments for one direction a -> b, from the public API's."""
    window_code, mode_code = encode_window(window, mode)
    return (
        pixel_major(feat_a),
        pixel_major(feat_b),
        None if mask_a is None else mask_a.contiguous(),
        None if mask_b is None else mask_b.contiguous(),
        window_code,
        mode_code,
        bool(normalize),
    )


def register_match_autograd(forward_op, backward_op) -> None:
    """Make ``forward_op`` (a name or an op) differentiable in its first two inputs, the feature
    maps, through ``backward_op(grad_values, xa, xb, indices, normalize) -> (grad_xa, grad_xb)``.

    Shared by both backends, whose ops take ``(xa, xb, ...options, normalize)``. ``indices`` are
    marked non-differentiable; the backward reads only the saved inputs and indices.
    """

    def setup_context(ctx, inputs, output):
        xa, xb = inputs[:2]
        ctx.normalize, ctx.options = inputs[-1], len(inputs) - 2
        ctx.save_for_backward(xa, xb, output[1])
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, grad_values, _grad_indices):
        xa, xb, indices = ctx.saved_tensors
        grad_xa, grad_xb = backward_op(grad_values.contiguous(), xa, xb, indices, ctx.normalize)
        return (grad_xa, grad_xb) + (None,) * ctx.options

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


def shape_values(xa: torch.Tensor):
    """``(values, indices)`` of the right shape, dtype and device without computing them (fake impls)."""
    B, H, W, _ = xa.shape
    values = xa.new_empty((B, H, W), dtype=accumulation_dtype(xa.dtype))
    return values, xa.new_empty((B, H, W), dtype=torch.int64)


def register_symmetric_autograd(forward_op, backward_op) -> None:
    """Autograd of a fused two-direction op ``(values_ab, indices_ab, values_ba, indices_ba)``.

    Its inputs are those of the one-direction op; the direction b -> a is the one-direction
    backward with the roles of a and b swapped, and the two contributions add up.
    """

    def setup_context(ctx, inputs, output):
        xa, xb = inputs[:2]
        ctx.normalize, ctx.options = inputs[-1], len(inputs) - 2
        ctx.save_for_backward(xa, xb, output[1], output[3])
        ctx.mark_non_differentiable(output[1], output[3])

    def backward(ctx, grad_ab, _grad_indices_ab, grad_ba, _grad_indices_ba):
        xa, xb, indices_ab, indices_ba = ctx.saved_tensors
        ga, gb = backward_op(grad_ab.contiguous(), xa, xb, indices_ab, ctx.normalize)
        gb2, ga2 = backward_op(grad_ba.contiguous(), xb, xa, indices_ba, ctx.normalize)
        return (ga + ga2, gb + gb2) + (None,) * ctx.options

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


def gradient_like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised gradient of ``x``: its dtype, shape and strides (``empty_like`` keeps the
    strides of a dense tensor: no layout copy on the way back), contiguous for an overlapping one."""
    return torch.empty_like(x)


def backward_shapes(xa, xb):
    """Gradients of the right shapes, dtypes and strides without computing them (fake impls)."""
    return gradient_like(xa), gradient_like(xb)
