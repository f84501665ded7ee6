"""One pass over a feature map before matching: per-voxel scales, and voxel-major rows if needed.

Kernel -> launcher. The ops take ``(B, C, *spatial)`` maps, seen voxel-major as ``(B, N, C)``
(:func:`._runtime.voxel_major`). Every op needs each voxel's normalisation factors, and the kernels
that read single voxels' C-vectors at scattered places (the dense and window scans' candidates, the
backward's gather) want those vectors contiguous. One kernel gives both from a single read of the
map: ``scale = 1 / max(||x_p||, eps)`` (1 without normalisation), ``curv = scale**3`` where the norm
is not clamped (0 elsewhere; ``d scale / d x_p = -curv * x_p``), and, when the channels are not
innermost already, a contiguous ``(B, N, C)`` copy. It stands in for a layout copy and the
half-dozen small PyTorch kernels of the same norms.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._numerics import NORMALIZE_EPS, accumulation_dtype
from ._runtime import is_interpreted, next_power_of_2


@triton.jit
def _prepare_kernel(
    x_ptr, rows_ptr, scale_ptr, curv_ptr,
    N, C, sxb, sxp, sxc,
    NORMALIZE: tl.constexpr, WRITE_ROWS: tl.constexpr, EPS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, IS_F64: tl.constexpr,
):
    # scale[p] = 1 / max(||x_p||, EPS),  curv[p] = scale[p]^3 if ||x_p|| > EPS else 0  (NORMALIZE)
    # scale[p] = 1,                      curv[p] = 0                                 (otherwise)
    # rows[p, :] = x_p                                                               (WRITE_ROWS)
    # The norm accumulates in float32 (float64); a NaN feature gives a NaN scale, an infinite one 0,
    # as in torch. Layout: x through its strides, rows (B, N, C) contiguous, scale / curv (B, N).
    # Grid: (cdiv(N, BLOCK_P), B).
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    pixels = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pixel_ok = pixels < N
    cs = tl.arange(0, BLOCK_C)
    if IS_F64:
        sum_sq = tl.zeros([BLOCK_P], tl.float64)
    else:
        sum_sq = tl.zeros([BLOCK_P], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cs
        ok = pixel_ok[:, None] & (cc < C)[None, :]
        x = tl.load(x_ptr + batch * sxb + pixels.to(tl.int64)[:, None] * sxp + cc.to(tl.int64)[None, :] * sxc,
                    mask=ok, other=0.0)
        if WRITE_ROWS:
            tl.store(rows_ptr + (batch * N + pixels.to(tl.int64))[:, None] * C + cc[None, :], x, mask=ok)
        xf = x.to(sum_sq.dtype)
        sum_sq += tl.sum(xf * xf, axis=1)
    if NORMALIZE:
        if IS_F64:
            norm = tl.sqrt(sum_sq)
            scale = 1.0 / tl.maximum(norm, EPS, propagate_nan=tl.PropagateNan.ALL)
        else:
            norm = tl.sqrt_rn(sum_sq)
            one = tl.full([BLOCK_P], 1.0, tl.float32)
            scale = tl.div_rn(one, tl.maximum(norm, EPS, propagate_nan=tl.PropagateNan.ALL))
        curv = tl.where(norm > EPS, scale * scale * scale, 0.0)
    else:
        scale = tl.full([BLOCK_P], 1.0, sum_sq.dtype)
        curv = tl.zeros([BLOCK_P], sum_sq.dtype)
    tl.store(scale_ptr + batch * N + pixels, scale, mask=pixel_ok)
    tl.store(curv_ptr + batch * N + pixels, curv, mask=pixel_ok)


INTERPRETED = is_interpreted(_prepare_kernel)


def prepare_features(x: torch.Tensor, normalize: bool, rows: bool):
    """``(rows, scale, curv)`` of a voxel-major ``(B, N, C)`` map ``x`` (any strides).

    ``rows`` is ``x`` itself when its channels are innermost (or when ``rows`` is False), else a
    contiguous copy; ``scale`` and ``curv`` are ``(B, N)`` contiguous in the accumulation dtype.
    """
    B, N, C = x.shape
    dtype = accumulation_dtype(x.dtype)
    write_rows = rows and x.stride(2) != 1 and C > 1
    out_rows = torch.empty((B, N, C), dtype=x.dtype, device=x.device) if write_rows else x
    scale = torch.empty((B, N), dtype=dtype, device=x.device)
    curv = torch.empty_like(scale)
    is_f64 = x.dtype == torch.float64
    BLOCK_C = min(next_power_of_2(C), 16 if INTERPRETED else 64)
    BLOCK_P = 32 if INTERPRETED else max(16, min(256, 8192 // BLOCK_C))
    _prepare_kernel[(triton.cdiv(N, BLOCK_P), B)](
        x, out_rows, scale, curv,
        N, C, *x.stride(),
        NORMALIZE=bool(normalize), WRITE_ROWS=write_rows, EPS=NORMALIZE_EPS,
        BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, IS_F64=is_f64,
        num_warps=4,
    )
    return out_rows, scale, curv
