"""Dense matching on the GPU: every pixel of ``b`` is a candidate of every pixel of ``a``.

Kernel -> launcher. The kernel follows the fused-attention pattern: a program keeps a tile of
``BLOCK_M`` queries resident, streams ``BLOCK_N``-pixel tiles of candidates through ``tl.dot`` and
keeps a running (max, argmax) per query in float32 registers, so the ``N x N`` similarity matrix
never exists. The backward pass does not come back here (see :mod:`.backward`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import feature_flags, is_interpreted, mask_pointer, next_power_of_2

# Index keys of the tile reduction: a NaN column keeps its index q < 2**30, a column at the row's
# max becomes q + _SHIFT, anything else _NO_HIT. So N must stay below 2**30 (checked by the op).
_SHIFT = 2**30
_NO_HIT = 2**31 - 1


@triton.jit
def _dense_match_fwd_kernel(
    xa_ptr, xb_ptr, sa_ptr, sb_ptr, ma_ptr, mb_ptr, values_ptr, indices_ptr,
    N, C,
    N_CLASS,  # shape class of N, only read by the autotuner's key
    HAS_MASK_A: tl.constexpr, HAS_MASK_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_K: tl.constexpr,
    IS_F64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # Forward of  values[p] = max_q s(p, q),  s(p, q) = sa[p] * sb[q] * <xa_p, xb_q>,
    #             indices[p] = the lowest q attaining it.
    # Gradient (computed by the backward kernels, through the saved indices): with q = indices[p]
    # and d_p = <xa_p, xb_q>, values[p] = sa[p] * sb[q] * d_p is locally a product, so
    #   d values[p] / d xa_p = sa[p] sb[q] xb_q,   d values[p] / d xb_q = sa[p] sb[q] xa_p,
    #   d values[p] / d sa[p] = sb[q] d_p,         d values[p] / d sb[q] = sa[p] d_p,
    # the subgradient autograd gives max(); no other candidate receives any gradient.
    #
    # sa[p] > 0 is a per-query constant, so the kernel maximises sb[q] * <xa_p, xb_q> over q and
    # multiplies by sa[p] once at the end: the same maximiser, one multiply fewer per pair.
    #
    # Layout: x*_ptr (B, N, C) pixel-major, s*_ptr / m*_ptr / values / indices (B, N).
    # Grid: (cdiv(N, BLOCK_M), B).
    pid_m = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    base = batch * N  # int64: B * N * C may exceed 2**31
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    ks = tl.arange(0, BLOCK_K)
    a_rows = xa_ptr + (base + rows.to(tl.int64))[:, None] * C
    b_base = xb_ptr + base * C

    if SINGLE_K:  # the whole C-vector of every query stays resident for the entire scan
        a_res = tl.load(a_rows + ks[None, :], mask=row_ok[:, None] & (ks < C)[None, :], other=0.0)
        if UPCAST:
            a_res = a_res.to(tl.float32)

    if IS_F64:
        best = tl.full([BLOCK_M], float("-inf"), tl.float64)
    else:
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK_M], -1, tl.int32)

    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        if HAS_MASK_B:
            col_ok = col_ok & (tl.load(mb_ptr + base + cols, mask=col_ok, other=0) != 0)
        b_rows = b_base + cols.to(tl.int64)[:, None] * C
        if IS_F64:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float64)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, C, BLOCK_K):
            kk = k0 + ks
            if SINGLE_K:
                a = a_res
            else:
                a = tl.load(a_rows + kk[None, :], mask=row_ok[:, None] & (kk < C)[None, :], other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
            # Masked-out candidates load as zeros: no NaN of theirs can reach the max.
            bt = tl.load(b_rows + kk[None, :], mask=col_ok[:, None] & (kk < C)[None, :], other=0.0)
            if UPCAST:
                bt = bt.to(tl.float32)
            if IS_F64:
                acc += tl.sum(a[:, None, :] * bt[None, :, :], axis=2)
            else:
                acc = tl.dot(a, tl.trans(bt), acc, input_precision=PRECISION)
        sb = tl.load(sb_ptr + base + cols, mask=col_ok, other=0.0)
        bias = tl.where(col_ok, 0.0, float("-inf"))
        s = acc * sb[None, :] + bias[None, :]  # (BLOCK_M, BLOCK_N); -inf where no candidate

        # Row max and the lowest column attaining it, with NaN winning as in torch.max. tl.max
        # skips NaN (compiled and interpreted alike), so NaN is found through the index: NaN
        # columns keep their index, columns at the max are shifted past every NaN column, and one
        # min-reduction gives the first NaN if any, else the first maximiser.
        tile_max = tl.max(s, 1)
        key = tl.where(s != s, cols[None, :], tl.where(s == tile_max[:, None], cols[None, :] + _SHIFT, _NO_HIT))
        tile_key = tl.min(key, 1)
        tile_nan = tile_key < _SHIFT
        tile_arg = tl.where(tile_nan, tile_key, tile_key - _SHIFT)
        tile_max = tl.where(tile_nan, float("nan"), tile_max)
        # A row whose every candidate here is -inf (raw features with infinities) still takes one.
        first_ok = tl.min(tl.where(col_ok, cols, _NO_HIT), 0)
        tile_arg = tl.where(tile_max == float("-inf"), first_ok, tile_arg)
        # Strictly greater wins, so earlier tiles (lower indices) keep ties; NaN beats any number
        # and the first NaN stays.
        better = (tile_max > best) | (tile_nan & (best == best))
        better = better | ((best_idx < 0) & (first_ok < _NO_HIT))
        best = tl.where(better, tile_max, best)
        best_idx = tl.where(better, tile_arg, best_idx)

    valid = row_ok & (best_idx >= 0)
    if HAS_MASK_A:
        valid = valid & (tl.load(ma_ptr + base + rows, mask=row_ok, other=0) != 0)
    sa = tl.load(sa_ptr + base + rows, mask=row_ok, other=0.0)
    tl.store(values_ptr + base + rows, tl.where(valid, tl.where(valid, best, 0.0) * sa, 0.0), mask=row_ok)
    tl.store(indices_ptr + base + rows, tl.where(valid, best_idx, -1).to(tl.int64), mask=row_ok)


INTERPRETED = is_interpreted(_dense_match_fwd_kernel)

# Autotuned block sizes per shape class (N_CLASS, C, dtypes, flags). Configs that do not fit a GPU's
# shared memory fail to compile and are skipped by the autotuner.
_TUNE_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1),
]
_TUNED_KERNEL = None if INTERPRETED else triton.autotune(
    configs=_TUNE_CONFIGS,
    key=["N_CLASS", "C", "HAS_MASK_A", "HAS_MASK_B", "BLOCK_K", "IS_F64", "PRECISION"],
)(_dense_match_fwd_kernel)

#: Below this many pixels per map a fixed tile is used (no autotuning: small maps are launch-bound).
AUTOTUNE_MIN_PIXELS = 4096


def shape_class(n: int) -> int:
    """The autotuner's bucket for N: the power of two at or above it."""
    return next_power_of_2(n)


def block_k(C: int, is_f64: bool) -> int:
    """Width of the channel chunk: all of C (>= 16 for ``tl.dot``) up to 128, else 64-wide chunks."""
    if is_f64:
        return min(next_power_of_2(C), 16)
    padded = max(16, next_power_of_2(C))
    return padded if padded <= 128 else 64


def fixed_blocks(N: int, is_f64: bool, interpreted: bool):
    """(BLOCK_M, BLOCK_N) without autotuning: small tiles for small maps, float64 and the interpreter."""
    tile = min(32 if is_f64 or interpreted else 64, max(16, next_power_of_2(N)))
    return tile, tile


def dense_match_forward(xa, xb, scale_a, scale_b, mask_a, mask_b):
    """Launch the dense kernel. Arguments as the op contract; returns ``(values, indices)`` (B, H, W).

    Shapes: ``xa``, ``xb`` (B, H, W, C) contiguous; scales (B, H, W) float32 (float64 for float64);
    masks None or bool (B, H, W). The caller (the op) has checked the contract.
    """
    B, H, W, C = xa.shape
    N = H * W
    flags = feature_flags(xa.dtype, xa.device, INTERPRETED)
    values = torch.empty((B, H, W), dtype=scale_a.dtype, device=xa.device)
    indices = torch.empty((B, H, W), dtype=torch.int64, device=xa.device)
    BLOCK_K = block_k(C, flags["IS_F64"])
    args = (
        xa, xb, scale_a, scale_b, mask_pointer(mask_a, values), mask_pointer(mask_b, values),
        values, indices, N, C, shape_class(N),
    )
    constants = dict(
        HAS_MASK_A=mask_a is not None, HAS_MASK_B=mask_b is not None,
        BLOCK_K=BLOCK_K, SINGLE_K=C <= BLOCK_K, **flags,
    )
    if _TUNED_KERNEL is not None and not flags["IS_F64"] and N >= AUTOTUNE_MIN_PIXELS:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B)  # noqa: E731
        _TUNED_KERNEL[grid](*args, **constants)
    else:
        BLOCK_M, BLOCK_N = fixed_blocks(N, flags["IS_F64"], INTERPRETED)
        grid = (triton.cdiv(N, BLOCK_M), B)
        _dense_match_fwd_kernel[grid](*args, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **constants)
    return values, indices
