"""The pixel-major op contract of the Triton backend, its autograd, and the window encoding.

The C++ backend shares :func:`encode_window` only: on a CPU every pass over the features costs
memory bandwidth, so its ops take the features as they are and normalise inside the kernels (see
:mod:`salign_kernels.ops.cpu`). On a GPU those passes are cheap next to the matching, and the
pixel-major layout with separate scales keeps the kernels simple.

The op contract
---------------
The ops take pixel-major features:

``forward(xa, xb, scale_a, scale_b, mask_a, mask_b, window, mode) -> (values, indices)``
    ``xa``, ``xb``: ``(B, H, W, C)`` contiguous, any supported float dtype (not upcast: the kernel
    accumulates in float32, float64 for float64). ``scale_a``, ``scale_b``: ``(B, H, W)`` in the
    accumulation dtype. ``mask_a``, ``mask_b``: optional bool ``(B, H, W)``. ``window``: 0 for dense,
    else the window size; ``mode``: :data:`WINDOW_MODES`. The similarity is

        s(p, q) = scale_a[p] * scale_b[q] * <xa_p, xb_q>

    and ``values[p] = max s(p, q)``, ``indices[p]`` = the lowest q attaining it, over the candidate
    set of the specification; ``-1`` and ``0`` for an invalid query. NaN similarities win the max
    (as in ``torch.max``), so NaN features give NaN values.

``backward(grad_values, xa, xb, scale_a, scale_b, indices) -> (grad_xa, grad_xb, grad_scale_a, grad_scale_b)``
    With ``g_p = grad_values[p]`` for valid p (0 otherwise), ``q = indices[p]`` and
    ``d_p = <xa_p, xb_q>`` (so ``values[p] = scale_a[p] * scale_b[q] * d_p``):

        grad_xa[p]      = g_p * scale_a[p] * scale_b[q] * xb_q                     (gather)
        grad_xb[q]      = scale_b[q] * sum_{p: indices[p] = q} g_p * scale_a[p] * xa_p   (scatter)
        grad_scale_a[p] = g_p * scale_b[q] * d_p
        grad_scale_b[q] = sum_{p: indices[p] = q} g_p * scale_a[p] * d_p

    Gradients of ``xa``/``xb`` come back in their dtype, of the scales in the accumulation dtype.

Normalisation is the scales: ``scale = 1 / max(||x||, eps)`` computed here with autograd, so the
chain through the norm is PyTorch's (the same as ``F.normalize`` in the reference), while the kernels
read the features once in their own dtype. Without normalisation the scales are ones.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._dtypes import accumulation_dtype
from ..reference import NORMALIZE_EPS

#: Integer codes of the window modes in the ops' schema.
WINDOW_MODES = {"sliding": 0, "partition": 1}


def pixel_major(feat: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W) -> (B, H, W, C)`` contiguous: each pixel's C-vector in one run of memory.

    Free for channels-last input, one copy otherwise; differentiable.
    """
    return feat.permute(0, 2, 3, 1).contiguous()


def pixel_scales(pixels: torch.Tensor, normalize: bool) -> torch.Tensor:
    """``(B, H, W, C) -> (B, H, W)``: ``1 / max(||x_p||, eps)`` when normalising, else ones.

    Takes the pixel-major features, so the norm reduces over contiguous memory. In the
    accumulation dtype (float32, float64 for float64) and differentiable; autocast is off so half
    inputs still get float32 norms.
    """
    dtype = accumulation_dtype(pixels.dtype)
    if not normalize:
        return torch.ones(pixels.shape[:3], dtype=dtype, device=pixels.device)
    with torch.autocast(pixels.device.type, enabled=False):
        norms = torch.linalg.vector_norm(pixels, dim=-1, dtype=dtype)
    return norms.clamp_min(NORMALIZE_EPS).reciprocal()


def encode_window(window: Optional[int], mode: str):
    """``(window, mode)`` as the ops take them: 0 means dense."""
    return (0 if window is None else int(window)), WINDOW_MODES[mode]


def op_arguments(feat_a, feat_b, window, mode, mask_a, mask_b, normalize):
    """The forward op's arguments for one direction a -> b, from the public API's."""
    window_code, mode_code = encode_window(window, mode)
    xa, xb = pixel_major(feat_a), pixel_major(feat_b)
    return (
        xa,
        xb,
        pixel_scales(xa, normalize),
        pixel_scales(xb, normalize),
        None if mask_a is None else mask_a.contiguous(),
        None if mask_b is None else mask_b.contiguous(),
        window_code,
        mode_code,
    )


def register_match_autograd(forward_op, backward_op) -> None:
    """Make ``forward_op`` differentiable in ``xa``, ``xb`` and the scales through ``backward_op``.

    ``indices`` are marked non-differentiable; the backward reads only the saved inputs and indices.
    """

    def setup_context(ctx, inputs, output):
        xa, xb, scale_a, scale_b = inputs[:4]
        ctx.save_for_backward(xa, xb, scale_a, scale_b, output[1])
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, grad_values, _grad_indices):
        xa, xb, scale_a, scale_b, indices = ctx.saved_tensors
        grads = backward_op(grad_values.contiguous(), xa, xb, scale_a, scale_b, indices)
        return (*grads, None, None, None, None)

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
        xa, xb, scale_a, scale_b = inputs[:4]
        ctx.save_for_backward(xa, xb, scale_a, scale_b, output[1], output[3])
        ctx.mark_non_differentiable(output[1], output[3])

    def backward(ctx, grad_ab, _grad_indices_ab, grad_ba, _grad_indices_ba):
        xa, xb, scale_a, scale_b, indices_ab, indices_ba = ctx.saved_tensors
        ga, gb, gsa, gsb = backward_op(grad_ab.contiguous(), xa, xb, scale_a, scale_b, indices_ab)
        gb2, ga2, gsb2, gsa2 = backward_op(grad_ba.contiguous(), xb, xa, scale_b, scale_a, indices_ba)
        return ga + ga2, gb + gb2, gsa + gsa2, gsb + gsb2, None, None, None, None

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


def backward_shapes(xa, xb, scale_a, scale_b):
    """Gradients of the right shapes and dtypes without computing them (fake impls)."""
    return (
        torch.empty_like(xa, memory_format=torch.contiguous_format),
        torch.empty_like(xb, memory_format=torch.contiguous_format),
        torch.empty_like(scale_a, memory_format=torch.contiguous_format),
        torch.empty_like(scale_b, memory_format=torch.contiguous_format),
    )
