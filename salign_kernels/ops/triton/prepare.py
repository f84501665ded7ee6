"""One pass over a feature map before matching: per-voxel scales, and voxel-major rows.

Kernel -> launcher. The ops take ``(B, C, *spatial)`` maps, seen voxel-major as ``(B, N, C)``
(:func:`._runtime.voxel_major`). Every op needs each voxel's normalisation factors, and the kernels
that read single voxels' C-vectors at scattered places (the dense and window scans' candidates, the
backward's gather) want those vectors contiguous. One kernel gives both from a single read of the
map (two passes over a voxel's channels, which stay in cache).

Robust norms. A voxel whose largest ``|x|`` lies outside ``[2^-40, 2^40]`` is first multiplied by
the power of two ``u = 2^-e`` (``e`` its largest entry's exponent) that brings it near 1: exact in
floating point, it keeps the squared norm from overflowing (``|x| >~ 1.8e19`` in float32) or
underflowing (``|x| <~ 1e-19``), and the products of the scans likewise. Voxels inside that range,
all the usual features, keep ``u = 1`` and so exactly the arithmetic of an unscaled norm.

Two modes:

- ``FORWARD``: ``rows = u x`` (contiguous; with normalisation always written, so that the scans'
  products are those of scaled voxels) and ``scale = 1 / max(||u x||, u eps)``, the factor that
  turns a row into ``x_hat = x / max(||x||, eps)``. Without normalisation ``u = 1``, ``scale = 1``
  and the rows are the map itself when its channels are innermost (raw products, IEEE as the
  reference's).
- backward: ``rows = x`` (a contiguous copy only when the channels are not innermost),
  ``scale = r = 1 / max(||x||, eps)`` (``= u / max(||u x||, u eps)``, never through a square) and
  ``proj = 1`` where the norm is not clamped (0 where it is, and without normalisation, where
  ``r = 1``): the factors of the gradient ``d/dx = r (d/dx_hat - proj x_hat <x_hat, d/dx_hat>)``.

A voxel holding NaN or Inf gets ``scale = NaN`` when normalising (``x / ||x||`` is NaN there, as in
``torch.nn.functional.normalize``), so its similarities are NaN whichever side it is on.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._numerics import NORMALIZE_EPS, accumulation_dtype
from .._library import rows_written
from ._runtime import is_interpreted, next_power_of_2

#: Voxels whose largest |x| has an exponent within +-SAFE_EXPONENT are not rescaled.
SAFE_EXPONENT = tl.constexpr(40)


@triton.jit
def _unit(largest, IS_F64: tl.constexpr):
    """``(u, finite)``: the power of two ``u`` that brings ``largest`` near 1 when it lies outside
    ``[2^-SAFE_EXPONENT, 2^SAFE_EXPONENT]`` (and is not 0), else 1; and whether ``largest`` is finite.
    Built from the exponent bits, clamped to the normal range (a denormal voxel is scaled up by the
    largest power that stays finite)."""
    if IS_F64:
        bits = largest.to(tl.int64, bitcast=True)
        exponent = ((bits >> 52) & 0x7FF) - 1023
        field = tl.minimum(tl.maximum(1023 - exponent, 1), 2046)
        u = (field.to(tl.int64) << 52).to(tl.float64, bitcast=True)
        finite = exponent < 1024
    else:
        bits = largest.to(tl.int32, bitcast=True)
        exponent = ((bits >> 23) & 0xFF) - 127
        field = tl.minimum(tl.maximum(127 - exponent, 1), 254)
        u = (field << 23).to(tl.float32, bitcast=True)
        finite = exponent < 128
    extreme = ((exponent > SAFE_EXPONENT) | (exponent < -SAFE_EXPONENT)) & (largest > 0)  # 0: no scaling
    return tl.where(finite & extreme, u, 1.0), finite


@triton.jit
def _prepare_map(
    x_ptr, rows_ptr, scale_ptr, proj_ptr, r_ptr, pid, batch,
    N, C, sxb, sxp, sxc,
    NORMALIZE: tl.constexpr, FORWARD: tl.constexpr, WRITE_ROWS: tl.constexpr, WRITE_R: tl.constexpr,
    EPS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, IS_F64: tl.constexpr,
):
    """One block of ``BLOCK_P`` voxels of one map (see the module docstring). ``WRITE_R`` (forward
    only) also stores the backward's ``r = u * scale`` beside the forward's ``scale``."""
    pixels = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pixel_ok = pixels < N
    cs = tl.arange(0, BLOCK_C)
    x_rows = x_ptr + batch * sxb + pixels.to(tl.int64)[:, None] * sxp
    out_rows = rows_ptr + (batch * N + pixels.to(tl.int64))[:, None] * C
    if IS_F64:
        acc_type = tl.float64
    else:
        acc_type = tl.float32
    u = tl.full([BLOCK_P], 1.0, acc_type)
    finite = tl.full([BLOCK_P], 1, tl.int1)
    if NORMALIZE:
        largest = tl.zeros([BLOCK_P], acc_type)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cs
            ok = pixel_ok[:, None] & (cc < C)[None, :]
            x = tl.load(x_rows + cc.to(tl.int64)[None, :] * sxc, mask=ok, other=0.0).to(acc_type)
            largest = tl.maximum(largest, tl.max(tl.abs(x), axis=1), propagate_nan=tl.PropagateNan.ALL)
        u, finite = _unit(largest, IS_F64)
    sum_sq = tl.zeros([BLOCK_P], acc_type)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cs
        ok = pixel_ok[:, None] & (cc < C)[None, :]
        x = tl.load(x_rows + cc.to(tl.int64)[None, :] * sxc, mask=ok, other=0.0)
        if FORWARD:
            x = (x.to(acc_type) * u[:, None]).to(x.dtype)  # exact: a power of two
        if WRITE_ROWS:
            tl.store(out_rows + cc[None, :], x, mask=ok)
        xf = x.to(acc_type)
        if not FORWARD:
            xf = xf * u[:, None]
        sum_sq += tl.sum(xf * xf, axis=1)
    if NORMALIZE:
        if IS_F64:
            norm = tl.sqrt(sum_sq)
            scaled = 1.0 / tl.maximum(norm, EPS * u, propagate_nan=tl.PropagateNan.ALL)
        else:
            norm = tl.sqrt_rn(sum_sq)
            one = tl.full([BLOCK_P], 1.0, tl.float32)
            scaled = tl.div_rn(one, tl.maximum(norm, EPS * u, propagate_nan=tl.PropagateNan.ALL))
        scale = scaled if FORWARD else scaled * u
        scale = tl.where(finite, scale, float("nan"))
        proj = tl.where(norm >= EPS * u, 1.0, 0.0)
    else:
        scale = tl.full([BLOCK_P], 1.0, acc_type)
        proj = tl.zeros([BLOCK_P], acc_type)
    tl.store(scale_ptr + batch * N + pixels, scale, mask=pixel_ok)
    tl.store(proj_ptr + batch * N + pixels, proj, mask=pixel_ok)
    if WRITE_R:
        if NORMALIZE:
            r = tl.where(finite, scaled * u, float("nan"))  # exact: a power of two
        else:
            r = scale
        tl.store(r_ptr + batch * N + pixels, r, mask=pixel_ok)


@triton.jit
def _prepare_kernel(
    x_ptr, rows_ptr, scale_ptr, proj_ptr,
    N, C, sxb, sxp, sxc,
    NORMALIZE: tl.constexpr, FORWARD: tl.constexpr, WRITE_ROWS: tl.constexpr, EPS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, IS_F64: tl.constexpr,
):
    # One map. Layout: x through its strides, rows (B, N, C) contiguous, scale / proj (B, N).
    # Grid: (cdiv(N, BLOCK_P), B).
    _prepare_map(x_ptr, rows_ptr, scale_ptr, proj_ptr, scale_ptr, tl.program_id(0), tl.program_id(1).to(tl.int64),
                 N, C, sxb, sxp, sxc, NORMALIZE, FORWARD, WRITE_ROWS, False, EPS, BLOCK_P, BLOCK_C, IS_F64)


@triton.jit
def _prepare_pair_kernel(
    xa_ptr, rows_a_ptr, factors_a_ptr, xb_ptr, rows_b_ptr, factors_b_ptr,
    N, BN, C, sab, sap, sac, sbb, sbp, sbc,
    NORMALIZE: tl.constexpr, WRITE_A: tl.constexpr, WRITE_B: tl.constexpr, EPS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, IS_F64: tl.constexpr,
):
    # Both maps of a fused loss in one launch, for the forward and its backward alike: rows, and
    # factors (3, B, N) = (scale, r, proj), planes of BN = B * N. Grid: (cdiv(N, BLOCK_P), B, 2),
    # the last axis the map.
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    if tl.program_id(2) == 0:
        _prepare_map(xa_ptr, rows_a_ptr, factors_a_ptr, factors_a_ptr + 2 * BN, factors_a_ptr + BN, pid, batch,
                     N, C, sab, sap, sac, NORMALIZE, True, WRITE_A, True, EPS, BLOCK_P, BLOCK_C, IS_F64)
    else:
        _prepare_map(xb_ptr, rows_b_ptr, factors_b_ptr, factors_b_ptr + 2 * BN, factors_b_ptr + BN, pid, batch,
                     N, C, sbb, sbp, sbc, NORMALIZE, True, WRITE_B, True, EPS, BLOCK_P, BLOCK_C, IS_F64)


INTERPRETED = is_interpreted(_prepare_kernel)


def _blocks(C: int):
    """``(BLOCK_P, BLOCK_C)``: a (BLOCK_P, BLOCK_C) tile of 2048 values per 128 threads, so the two
    passes over the channels, software-pipelined, stay in registers (4096 and more spilled at sm_90)."""
    BLOCK_C = min(next_power_of_2(C), 16 if INTERPRETED else 64)
    BLOCK_P = 32 if INTERPRETED else max(16, min(256, 2048 // BLOCK_C))
    return BLOCK_P, BLOCK_C


def _launch(x: torch.Tensor, normalize: bool, forward: bool, write_rows: bool):
    B, N, C = x.shape
    dtype = accumulation_dtype(x.dtype)
    rows = torch.empty((B, N, C), dtype=x.dtype, device=x.device) if write_rows else x
    scale = torch.empty((B, N), dtype=dtype, device=x.device)
    proj = torch.empty_like(scale)
    BLOCK_P, BLOCK_C = _blocks(C)
    _prepare_kernel[(triton.cdiv(N, BLOCK_P), B)](
        x, rows, scale, proj,
        N, C, *x.stride(),
        NORMALIZE=bool(normalize), FORWARD=forward, WRITE_ROWS=write_rows, EPS=NORMALIZE_EPS,
        BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, IS_F64=x.dtype == torch.float64,
        num_warps=4,
    )
    return rows, scale, proj


def forward_rows(x: torch.Tensor, normalize: bool):
    """``(rows, scale)`` of a voxel-major ``(B, N, C)`` map ``x`` (any strides) for the scans:
    contiguous rows ``u x`` (``x`` itself without normalisation when its channels are innermost)
    and ``scale`` ``(B, N)`` in the accumulation dtype, with ``scale * rows = x_hat``."""
    rows, scale, _ = _launch(x, normalize, True, writes_rows(x, normalize))
    return rows, scale


def backward_factors(x: torch.Tensor, normalize: bool, rows: bool):
    """``(rows, r, proj)`` of a voxel-major map for the backward: ``rows`` is ``x`` itself when its
    channels are innermost (or when ``rows`` is False), else a contiguous copy; ``r = 1 / max(||x||,
    eps)`` and ``proj`` (1 where the norm is not clamped) are ``(B, N)`` (``r = 1``, ``proj = 0``
    without normalisation)."""
    return _launch(x, normalize, False, rows and rows_written(False, x.shape[2], x.stride(2)))


def writes_rows(x: torch.Tensor, normalize: bool) -> bool:
    """Whether the forward writes a voxel-major map's rows (else the scans read ``x`` itself):
    :func:`salign_kernels.ops._library.rows_written`, the rule the fused op's contract states."""
    return rows_written(normalize, x.shape[2], x.stride(2))


def prepare_pair(xa: torch.Tensor, xb: torch.Tensor, normalize: bool, write_a: bool, write_b: bool):
    """Both maps of a loss in one launch: ``(rows_a, factors_a, rows_b, factors_b)``.

    ``xa``, ``xb`` voxel-major (B, N, C), any strides. ``rows_*``: contiguous ``u x`` (B, N, C) when
    ``write_*``, else ``x`` itself; ``factors_*`` (3, B, N) in the accumulation dtype: the forward's
    ``scale`` (``scale * rows = x_hat``), the backward's ``r = 1 / max(||x||, eps)`` and ``proj``
    (1 where the norm is not clamped; ``r = 1``, ``proj = 0`` without normalisation). The backward of
    a fused loss reads these instead of preparing the maps again.
    """
    B, N, C = xa.shape
    dtype = accumulation_dtype(xa.dtype)
    rows_a = torch.empty((B, N, C), dtype=xa.dtype, device=xa.device) if write_a else xa
    rows_b = torch.empty((B, N, C), dtype=xb.dtype, device=xb.device) if write_b else xb
    factors_a = torch.empty((3, B, N), dtype=dtype, device=xa.device)
    factors_b = torch.empty((3, B, N), dtype=dtype, device=xb.device)
    BLOCK_P, BLOCK_C = _blocks(C)
    _prepare_pair_kernel[(triton.cdiv(N, BLOCK_P), B, 2)](
        xa, rows_a, factors_a, xb, rows_b, factors_b,
        N, B * N, C, *xa.stride(), *xb.stride(),
        NORMALIZE=bool(normalize), WRITE_A=bool(write_a), WRITE_B=bool(write_b), EPS=NORMALIZE_EPS,
        BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, IS_F64=xa.dtype == torch.float64,
        num_warps=4,
    )
    return rows_a, factors_a, rows_b, factors_b
