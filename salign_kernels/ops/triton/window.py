"""Windowed matching on the GPU: sliding (centred neighbourhood) and partition (same tile), 2D and 3D.

Kernel -> launcher. A window holds few candidates (49 for 7 x 7, 125 for 5 x 5 x 5), too few for a
matrix product to pay off as written here: the op is bandwidth-bound. A program takes a 2-D tile of
``TILE_H x TILE_W`` queries of one depth slice, keeps their C-vectors resident, and walks the
window's offsets; the candidate rows it loads for one offset are the halo of the tile shifted by
that offset, so neighbouring offsets hit the same cache lines and every feature is read from memory
about once. A 2D map is a volume of depth 1 with window depth 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._matching import WINDOW_MODE_CODES
from ._argmax import NO_HIT, block_argmax, fold_best
from ._runtime import feature_flags, is_interpreted, mask_pointer, next_power_of_2


@triton.jit
def _window_match_fwd_kernel(
    xa_ptr, xb_ptr, sa_ptr, sb_ptr, ma_ptr, mb_ptr, values_ptr, indices_ptr,
    D, H, W, C, KD, KH, KW, TILES_W, TILES_HW,
    sab, sap, sac, sbb, sbp, sbc,  # strides of xa and xb: batch, voxel, channel
    PARTITION: tl.constexpr, HAS_MASK_A: tl.constexpr, HAS_MASK_B: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_C: tl.constexpr, SINGLE_C: tl.constexpr, IS_F64: tl.constexpr,
):
    # Forward of  values[p] = max_{q in Q(p)} sa[p] * sb[q] * <xa_p, xb_q>,  indices[p] = lowest such q,
    # Q(p) = the KD x KH x KW neighbourhood of p clipped to the map (sliding), or p's tile
    # (partition), less the candidates masked out in b.
    # Gradient (backward kernels, through the saved indices): with q = indices[p], d_p = <xa_p, xb_q>,
    #   d values[p] / d xa_p = sa[p] sb[q] xb_q,   d values[p] / d xb_q = sa[p] sb[q] xa_p,
    #   d values[p] / d sa[p] = sb[q] d_p,         d values[p] / d sb[q] = sa[p] d_p;
    # exactly what autograd gives the windowed max of the reference.
    #
    # The window offsets j = 0 .. KD*KH*KW - 1 are taken BLOCK_J at a time, in row-major order
    # (depth, row, column), which is increasing candidate index q for every query: within a chunk
    # the lowest q at the max wins, and a later chunk replaces the best only when strictly greater,
    # so ties keep the lowest index. sa[p] > 0 multiplies once at the end (same maximiser).
    # Grid: (cdiv(H, TILE_H) * cdiv(W, TILE_W) * D, B).
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    d = pid // TILES_HW
    tile = pid % TILES_HW
    HW = H * W
    N = D * HW
    base = batch * N
    q = tl.arange(0, TILE_H * TILE_W)
    h = (tile // TILES_W) * TILE_H + q // TILE_W
    w = (tile % TILES_W) * TILE_W + q % TILE_W
    row_ok = (h < H) & (w < W)
    p = d * HW + h * W + w
    cs = tl.arange(0, BLOCK_C)
    a_rows = xa_ptr + batch * sab + p.to(tl.int64)[:, None] * sap  # (Q, 1)
    if SINGLE_C:
        a_res = tl.load(a_rows + cs.to(tl.int64)[None, :] * sac, mask=row_ok[:, None] & (cs < C)[None, :], other=0.0)
    if PARTITION:
        front = (d // KD) * KD
        top = (h // KH) * KH
        left = (w // KW) * KW
    else:
        front = d - KD // 2
        top = h - KH // 2
        left = w - KW // 2

    if IS_F64:
        best = tl.full([TILE_H * TILE_W], float("-inf"), tl.float64)
    else:
        best = tl.full([TILE_H * TILE_W], float("-inf"), tl.float32)
    best_idx = tl.full([TILE_H * TILE_W], -1, tl.int32)
    first = tl.full([TILE_H * TILE_W], NO_HIT, tl.int32)  # where a non-finite query (scale NaN) goes

    K = KD * KH * KW
    for j0 in range(0, K, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        cd = front + j // (KH * KW)  # (J,) candidate depth: the same for the whole tile
        ch = top[:, None] + ((j // KW) % KH)[None, :]  # (Q, J) candidate rows and columns
        cw = left[:, None] + (j % KW)[None, :]
        ok = row_ok[:, None] & ((j < K) & (cd >= 0) & (cd < D))[None, :]
        ok = ok & (ch >= 0) & (ch < H) & (cw >= 0) & (cw < W)
        cq = cd[None, :] * HW + ch * W + cw
        if HAS_MASK_B:
            ok = ok & (tl.load(mb_ptr + base + cq, mask=ok, other=0) != 0)
        cq = tl.where(ok, cq, 0)  # off-map offsets would give negative keys below
        b_rows = xb_ptr + batch * sbb + cq.to(tl.int64)[:, :, None] * sbp  # (Q, J, 1)
        if IS_F64:
            acc = tl.zeros([TILE_H * TILE_W, BLOCK_J], tl.float64)
        else:
            acc = tl.zeros([TILE_H * TILE_W, BLOCK_J], tl.float32)
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
                acc += tl.sum(a.to(tl.float64)[:, None, :] * bv.to(tl.float64), axis=2)
            else:
                acc += tl.sum(a.to(tl.float32)[:, None, :] * bv.to(tl.float32), axis=2)
        sb = tl.load(sb_ptr + base + cq, mask=ok, other=0.0)
        s = tl.where(ok, acc * sb, float("-inf"))  # (Q, J)

        # The lowest q at the chunk's max (the lowest NaN: NaN wins), merged into the running best.
        chunk_max, chunk_arg, chunk_nan, first_ok = block_argmax(s, cq, ok, 1)
        best, best_idx = fold_best(best, best_idx, chunk_max, chunk_arg, chunk_nan, first_ok)
        first = tl.minimum(first, first_ok)

    sa = tl.load(sa_ptr + base + p, mask=row_ok, other=0.0)
    best_idx = tl.where((sa != sa) & (first < NO_HIT), first, best_idx)
    valid = row_ok & (best_idx >= 0)
    if HAS_MASK_A:
        valid = valid & (tl.load(ma_ptr + base + p, mask=row_ok, other=0) != 0)
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


#: Elements of the (queries x offsets x channels) tile under the interpreter: few steps (numpy is
#: fast per op, slow per op count), within Triton's limit of 2^20 elements per block.
INTERPRETER_TILE = 2**18


def block_j(window: int, queries: int, block_c: int, interpreted: bool, is_f64: bool = False) -> int:
    """Window offsets per step (``window``: their number): under the interpreter as many as keep the
    (queries x offsets x channels) tile within :data:`INTERPRETER_TILE`; on a GPU as many as keep it
    at about 8K float32 (4K float64) elements, i.e. in registers."""
    offsets = next_power_of_2(window)
    budget = INTERPRETER_TILE if interpreted else (4096 if is_f64 else 8192)
    return max(1, min(offsets, budget // (queries * block_c)))


def block_c(C: int) -> int:
    """Channel chunk: all of C up to 128 (resident), else 64-wide chunks."""
    padded = next_power_of_2(C)
    return padded if padded <= 128 else 64


def window_match_forward(xa, xb, scale_a, scale_b, mask_a, mask_b, spatial, window, mode: int):
    """Launch the window kernel; returns ``(values, indices)``, each (B, N).

    ``xa``, ``xb`` voxel-major (B, N, C) with the channels innermost (candidates are gathered per
    voxel); ``spatial`` is (H, W) or (D, H, W) and ``window`` one size per axis (odd when sliding),
    ``mode`` a value of :data:`WINDOW_MODE_CODES`; checked by the op.
    """
    B, N, C = xa.shape
    D, H, W = (1, *spatial) if len(spatial) == 2 else spatial
    KD, KH, KW = (1, *window) if len(window) == 2 else window
    flags = feature_flags(xa.dtype, xa.device, INTERPRETED)
    values = torch.empty((B, N), dtype=scale_a.dtype, device=xa.device)
    indices = torch.empty((B, N), dtype=torch.int64, device=xa.device)
    is_f64 = flags["IS_F64"]
    TILE_H, TILE_W = query_tile(H, W, C, INTERPRETED, is_f64)
    BLOCK_C = block_c(C)
    BLOCK_J = block_j(KD * KH * KW, TILE_H * TILE_W, BLOCK_C, INTERPRETED, is_f64)
    tiles_w = triton.cdiv(W, TILE_W)
    tiles_hw = triton.cdiv(H, TILE_H) * tiles_w
    grid = (tiles_hw * D, B)
    _window_match_fwd_kernel[grid](
        xa, xb, scale_a, scale_b, mask_pointer(mask_a, values), mask_pointer(mask_b, values),
        values, indices, D, H, W, C, KD, KH, KW, tiles_w, tiles_hw, *xa.stride(), *xb.stride(),
        PARTITION=mode == WINDOW_MODE_CODES["partition"],
        HAS_MASK_A=mask_a is not None, HAS_MASK_B=mask_b is not None,
        TILE_H=TILE_H, TILE_W=TILE_W, BLOCK_J=BLOCK_J, BLOCK_C=BLOCK_C, SINGLE_C=C <= BLOCK_C,
        IS_F64=flags["IS_F64"],
        num_warps=4,
    )
    return values, indices
