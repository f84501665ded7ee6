"""Windowed matching on the GPU: sliding (centred k x k neighbourhood) and partition (same k x k tile).

Kernel -> launcher. A window holds at most k^2 candidates (49 for k = 7), far too few for a matrix
product to pay off: the op is bandwidth-bound. A program takes a 2-D tile of ``TILE_H x TILE_W``
queries, keeps their C-vectors resident, and walks the k^2 window offsets; the candidate rows it
loads for one offset are the halo of the tile shifted by that offset, so neighbouring offsets hit
the same cache lines and every feature is read from memory about once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import WINDOW_MODES
from ._runtime import feature_flags, is_interpreted, mask_pointer, next_power_of_2, pixel_strides
from ._argmax import block_argmax, fold_best


@triton.jit
def _window_match_fwd_kernel(
    xa_ptr, xb_ptr, sa_ptr, sb_ptr, ma_ptr, mb_ptr, values_ptr, indices_ptr,
    H, W, C, WINDOW, TILES_W,
    sab, sap, sac, sbb, sbp, sbc,  # strides of xa and xb: batch, pixel, channel
    PARTITION: tl.constexpr, HAS_MASK_A: tl.constexpr, HAS_MASK_B: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_C: tl.constexpr, SINGLE_C: tl.constexpr, IS_F64: tl.constexpr,
):
    # Forward of  values[p] = max_{q in Q(p)} sa[p] * sb[q] * <xa_p, xb_q>,  indices[p] = lowest such q,
    # Q(p) = the k x k neighbourhood of p clipped to the map (sliding), or p's k x k tile (partition),
    # less the candidates masked out in b.
    # Gradient (backward kernels, through the saved indices): with q = indices[p], d_p = <xa_p, xb_q>,
    #   d values[p] / d xa_p = sa[p] sb[q] xb_q,   d values[p] / d xb_q = sa[p] sb[q] xa_p,
    #   d values[p] / d sa[p] = sb[q] d_p,         d values[p] / d sb[q] = sa[p] d_p;
    # exactly what autograd gives the windowed max of the reference.
    #
    # The window offsets j = 0 .. k^2 - 1 are taken BLOCK_J at a time, in row-major order, which is
    # increasing candidate index q for every query: within a chunk the lowest q at the max wins,
    # and a later chunk replaces the best only when strictly greater, so ties keep the lowest index.
    # sa[p] > 0 multiplies once at the end (same maximiser as multiplying every candidate).
    # Grid: (cdiv(H, TILE_H) * cdiv(W, TILE_W), B).
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    N = H * W
    base = batch * N
    q = tl.arange(0, TILE_H * TILE_W)
    h = (pid // TILES_W) * TILE_H + q // TILE_W
    w = (pid % TILES_W) * TILE_W + q % TILE_W
    row_ok = (h < H) & (w < W)
    p = h * W + w
    cs = tl.arange(0, BLOCK_C)
    a_rows = xa_ptr + batch * sab + p.to(tl.int64)[:, None] * sap  # (Q, 1)
    if SINGLE_C:
        a_res = tl.load(a_rows + cs.to(tl.int64)[None, :] * sac, mask=row_ok[:, None] & (cs < C)[None, :], other=0.0)
    if PARTITION:
        top = (h // WINDOW) * WINDOW
        left = (w // WINDOW) * WINDOW
    else:
        top = h - WINDOW // 2
        left = w - WINDOW // 2

    if IS_F64:
        best = tl.full([TILE_H * TILE_W], float("-inf"), tl.float64)
    else:
        best = tl.full([TILE_H * TILE_W], float("-inf"), tl.float32)
    best_idx = tl.full([TILE_H * TILE_W], -1, tl.int32)

    for j0 in range(0, WINDOW * WINDOW, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        ch = top[:, None] + (j // WINDOW)[None, :]  # (Q, J) candidate rows and columns
        cw = left[:, None] + (j % WINDOW)[None, :]
        ok = row_ok[:, None] & (j < WINDOW * WINDOW)[None, :]
        ok = ok & (ch >= 0) & (ch < H) & (cw >= 0) & (cw < W)
        cq = ch * W + cw
        if HAS_MASK_B:
            ok = ok & (tl.load(mb_ptr + base + cq, mask=ok, other=0) != 0)
        cq = tl.where(ok, cq, 0)  # off-map offsets would give negative keys below
        b_rows = xb_ptr + batch * sbb + cq.to(tl.int64)[:, :, None] * sbp  # (Q, J, 1)
        if IS_F64:
            d = tl.zeros([TILE_H * TILE_W, BLOCK_J], tl.float64)
        else:
            d = tl.zeros([TILE_H * TILE_W, BLOCK_J], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cs
            if SINGLE_C:
                a = a_res
            else:
                a = tl.load(a_rows + cc.to(tl.int64)[None, :] * sac, mask=row_ok[:, None] & (cc < C)[None, :], other=0.0)
            # Masked-out candidates load as zeros: no NaN of theirs can reach the max.
            bv = tl.load(b_rows + cc.to(tl.int64)[None, None, :] * sbc, mask=ok[:, :, None] & (cc < C)[None, None, :],
                         other=0.0)
            if IS_F64:
                d += tl.sum(a.to(tl.float64)[:, None, :] * bv.to(tl.float64), axis=2)
            else:
                d += tl.sum(a.to(tl.float32)[:, None, :] * bv.to(tl.float32), axis=2)
        sb = tl.load(sb_ptr + base + cq, mask=ok, other=0.0)
        s = tl.where(ok, d * sb, float("-inf"))  # (Q, J)

        # The lowest q at the chunk's max (the lowest NaN: NaN wins), merged into the running best.
        chunk_max, chunk_arg, chunk_nan, first_ok = block_argmax(s, cq, ok, 1)
        best, best_idx = fold_best(best, best_idx, chunk_max, chunk_arg, chunk_nan, first_ok)

    valid = row_ok & (best_idx >= 0)
    if HAS_MASK_A:
        valid = valid & (tl.load(ma_ptr + base + p, mask=row_ok, other=0) != 0)
    sa = tl.load(sa_ptr + base + p, mask=row_ok, other=0.0)
    tl.store(values_ptr + base + p, tl.where(valid, tl.where(valid, best, 0.0) * sa, 0.0), mask=row_ok)
    tl.store(indices_ptr + base + p, tl.where(valid, best_idx, -1).to(tl.int64), mask=row_ok)


INTERPRETED = is_interpreted(_window_match_fwd_kernel)


def query_tile(H: int, W: int, C: int, interpreted: bool, is_f64: bool = False):
    """(TILE_H, TILE_W): a 2-D tile of about 64 queries (32 for wide C or float64), as square as
    the map allows.

    Wide and short maps (1 x N) get a 1 x 64 strip, tall and narrow ones a 64 x 1 column.
    """
    target = 64 if interpreted or (C <= 64 and not is_f64) else 32
    tile_w = min(next_power_of_2(W), 8 if H > 1 else target)
    tile_h = min(next_power_of_2(H), max(1, target // tile_w))
    return tile_h, tile_w


def block_j(window: int, queries: int, block_c: int, interpreted: bool, is_f64: bool = False) -> int:
    """Window offsets per step: every offset at once under the interpreter (numpy is fast per op,
    slow per op count); on a GPU as many as keep the (queries x offsets x channels) tile at about
    8K float32 (4K float64) elements, i.e. in registers."""
    offsets = next_power_of_2(window * window)
    if interpreted:
        return offsets
    budget = 4096 if is_f64 else 8192
    return max(1, min(offsets, budget // (queries * block_c)))


def block_c(C: int) -> int:
    """Channel chunk: all of C up to 128 (resident), else 64-wide chunks."""
    padded = next_power_of_2(C)
    return padded if padded <= 128 else 64


def window_match_forward(xa, xb, scale_a, scale_b, mask_a, mask_b, window: int, mode: int):
    """Launch the window kernel. Arguments as the op contract; returns ``(values, indices)`` (B, H, W).

    ``window`` >= 1 (odd when sliding), ``mode`` a value of :data:`WINDOW_MODES`; checked by the op,
    which passes channels-innermost rows (candidates are gathered per pixel).
    """
    B, H, W, C = xa.shape
    flags = feature_flags(xa.dtype, xa.device, INTERPRETED)
    values = torch.empty((B, H, W), dtype=scale_a.dtype, device=xa.device)
    indices = torch.empty((B, H, W), dtype=torch.int64, device=xa.device)
    is_f64 = flags["IS_F64"]
    TILE_H, TILE_W = query_tile(H, W, C, INTERPRETED, is_f64)
    BLOCK_C = block_c(C)
    BLOCK_J = block_j(window, TILE_H * TILE_W, BLOCK_C, INTERPRETED, is_f64)
    tiles_w = triton.cdiv(W, TILE_W)
    grid = (triton.cdiv(H, TILE_H) * tiles_w, B)
    _window_match_fwd_kernel[grid](
        xa, xb, scale_a, scale_b, mask_pointer(mask_a, values), mask_pointer(mask_b, values),
        values, indices, H, W, C, window, tiles_w, *pixel_strides(xa), *pixel_strides(xb),
        PARTITION=mode == WINDOW_MODES["partition"],
        HAS_MASK_A=mask_a is not None, HAS_MASK_B=mask_b is not None,
        TILE_H=TILE_H, TILE_W=TILE_W, BLOCK_J=BLOCK_J, BLOCK_C=BLOCK_C, SINGLE_C=C <= BLOCK_C,
        IS_F64=flags["IS_F64"],
        num_warps=4,
    )
    return values, indices
