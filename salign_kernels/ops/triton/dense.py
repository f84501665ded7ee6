"""Dense matching on the GPU: every pixel of ``b`` is a candidate of every pixel of ``a``.

Kernel -> launcher. The kernel follows the fused-attention pattern: a program keeps a tile of
``BLOCK_M`` queries resident, streams ``BLOCK_N``-pixel tiles of candidates through ``tl.dot`` and
keeps a running (max, argmax) per query in float32 registers, so the ``N x N`` similarity matrix
never exists. The backward pass does not come back here (see :mod:`.backward`).

What a tile costs besides its product is the (max, argmax) epilogue, on the GPU's half-rate ALU
pipe; the scan keeps it to a NaN-keeping row max, one compare-select-min for the lowest column at
it, and a merge into the running best:

- full candidate tiles of an unmasked ``b`` run without any per-element mask (only the ragged last
  tile, and every tile of a masked ``b``, select their candidates);
- with ``PREFETCH`` the next tile's product is issued before this tile's epilogue, so the tensor
  cores work while the epilogue runs;
- the rare cases leave the loop: a row whose maximum came out NaN (a NaN similarity, which wins at
  its first index as in ``torch.max``) and a row without a finite or ``+inf`` candidate (it takes
  its first candidate) are settled after the scan, by passes that run only when a row needs them.

Both directions of a symmetric problem are two such scans (b -> a with the roles swapped): two
lean passes cost less than one pass that also reduces down the columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._argmax import NO_HIT, fold_strict, tile_argmax
from ._loss import store_partial
from ._runtime import feature_flags, is_interpreted, mask_pointer, next_power_of_2
from ._tiles import resident_queries, tile_product

# Marks the scan leaves in indices for _dense_settle_kernel (valid indices are >= 0, -1 is "no match").
NEEDS_NAN = tl.constexpr(-2)
NEEDS_FIRST = tl.constexpr(-3)


@triton.jit
def _similarity_tile(
    a_res, a_rows, row_in, b_base, start, N, C, sac, sbp, sbc, mb_ptr, base,
    MASKED: tl.constexpr, HAS_MASK_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_K: tl.constexpr,
    EVEN_K: tl.constexpr, IS_F64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """``(acc, col_ok)``: ``acc[i, j] = <xa_p, xb_q>`` for the queries of the block (rows) and the
    candidates ``q = start + j``, in float32 (float64); ``col_ok`` whether ``q`` is a candidate.

    ``MASKED``: the tile may hold non-candidates (past ``N``, or masked out in ``b``); their rows
    load as zeros (no NaN of theirs reaches a product) and the caller selects through ``col_ok``.
    Otherwise the tile is full and unmasked: no predicate at all (``col_ok`` is not computed).
    """
    cols = start + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if MASKED and HAS_MASK_B:
        col_ok = col_ok & (tl.load(mb_ptr + base + cols, mask=col_ok, other=0) != 0)
    b_rows = b_base + cols.to(tl.int64)[:, None] * sbp
    acc = tile_product(a_res, a_rows, row_in, b_rows, col_ok, C, sac, sbc, MASKED, BLOCK_M, BLOCK_N, BLOCK_K,
                       SINGLE_K, EVEN_K, IS_F64, UPCAST, PRECISION)
    return acc, col_ok


@triton.jit
def _fold_tile(acc, col_ok, start, sb_ptr, base, best, best_idx, saw_nan, MASKED: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Merge one tile of products into the running ``(best, best_idx)`` of its rows.

    ``s = acc * sb[q]``; the row max keeps NaN (flagged in ``saw_nan``, settled after the scan), the
    lowest column at it is the tile's argmax, and a tile replaces the best only when strictly
    greater, so earlier tiles (lower indices) keep ties. Non-candidates of a ``MASKED`` tile are
    ``-inf``: never strictly greater than the initial ``-inf``, so a row without a finite or
    ``+inf`` candidate keeps ``best == -inf`` (settled after the scan too).
    """
    cols = start + tl.arange(0, BLOCK_N)
    if MASKED:
        sb = tl.load(sb_ptr + base + cols, mask=col_ok, other=0.0)
        s = tl.where(col_ok[None, :], acc * sb[None, :], float("-inf"))
    else:
        sb = tl.load(sb_ptr + base + cols)
        s = acc * sb[None, :]
    top, arg = tile_argmax(s, cols[None, :])
    return fold_strict(best, best_idx, saw_nan, top, arg)


@triton.jit
def _scan(
    a_res, a_rows, row_in, b_base, sb_ptr, mb_ptr, base, lo, hi, N, C, sac, sbp, sbc,
    best, best_idx, saw_nan,
    MASKED: tl.constexpr, PREFETCH: tl.constexpr, HAS_MASK_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_K: tl.constexpr,
    EVEN_K: tl.constexpr, IS_F64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """The candidate tiles starting at ``lo, lo + BLOCK_N, ... < hi`` folded into the running best.

    ``PREFETCH`` (the caller guarantees ``hi > lo``): tile ``t + 1``'s product is issued before tile
    ``t``'s epilogue, which keeps two accumulators live and lets the MMA run under the epilogue.
    """
    if PREFETCH:
        acc, col_ok = _similarity_tile(a_res, a_rows, row_in, b_base, lo, N, C, sac, sbp, sbc, mb_ptr, base,
                                       MASKED, HAS_MASK_B, BLOCK_M, BLOCK_N, BLOCK_K, SINGLE_K, EVEN_K, IS_F64,
                                       UPCAST, PRECISION)
        for start in range(lo + BLOCK_N, hi, BLOCK_N):
            nxt, nxt_ok = _similarity_tile(a_res, a_rows, row_in, b_base, start, N, C, sac, sbp, sbc, mb_ptr, base,
                                           MASKED, HAS_MASK_B, BLOCK_M, BLOCK_N, BLOCK_K, SINGLE_K, EVEN_K, IS_F64,
                                           UPCAST, PRECISION)
            best, best_idx, saw_nan = _fold_tile(acc, col_ok, start - BLOCK_N, sb_ptr, base, best, best_idx,
                                                 saw_nan, MASKED, BLOCK_N)
            acc, col_ok = nxt, nxt_ok
        last = lo + ((hi - lo - 1) // BLOCK_N) * BLOCK_N
        best, best_idx, saw_nan = _fold_tile(acc, col_ok, last, sb_ptr, base, best, best_idx, saw_nan, MASKED,
                                             BLOCK_N)
    else:
        for start in range(lo, hi, BLOCK_N):
            acc, col_ok = _similarity_tile(a_res, a_rows, row_in, b_base, start, N, C, sac, sbp, sbc, mb_ptr, base,
                                           MASKED, HAS_MASK_B, BLOCK_M, BLOCK_N, BLOCK_K, SINGLE_K, EVEN_K, IS_F64,
                                           UPCAST, PRECISION)
            best, best_idx, saw_nan = _fold_tile(acc, col_ok, start, sb_ptr, base, best, best_idx, saw_nan, MASKED,
                                                 BLOCK_N)
    return best, best_idx, saw_nan


@triton.jit
def _dense_match_fwd_kernel(
    xa_ptr, xb_ptr, sa_ptr, sb_ptr, ma_ptr, mb_ptr, values_ptr, indices_ptr,
    N, C,
    sab, sap, sac, sbb, sbp, sbc,  # strides of xa and xb: batch, pixel, channel
    N_CLASS,  # shape class of N, only read by the autotuner's key
    HAS_MASK_A: tl.constexpr, HAS_MASK_B: tl.constexpr, PREFETCH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_K: tl.constexpr,
    EVEN_K: tl.constexpr, IS_F64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
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
    # Layout: x*_ptr (B, N, C) through their strides (pixel-major or channel-major alike),
    # s*_ptr / m*_ptr / values / indices (B, N) contiguous. Grid: (cdiv(N, BLOCK_M), B).
    # PREFETCH needs at least one full tile of an unmasked b (N >= BLOCK_N), or a masked b.
    pid_m = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    base = batch * N  # int64: B * N * C may exceed 2**31
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    a_rows = xa_ptr + batch * sab + rows.to(tl.int64)[:, None] * sap
    b_base = xb_ptr + batch * sbb
    row_in = row_ok
    if HAS_MASK_A:
        row_in = row_in & (tl.load(ma_ptr + base + rows, mask=row_ok, other=0) != 0)

    a_res = a_rows  # placeholder when the channels come in chunks
    if SINGLE_K:
        a_res = resident_queries(a_rows, row_in, C, sac, BLOCK_K, UPCAST)

    if IS_F64:
        best = tl.full([BLOCK_M], float("-inf"), tl.float64)
    else:
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK_M], -1, tl.int32)
    saw_nan = tl.zeros([BLOCK_M], tl.int32)

    if HAS_MASK_B:  # every tile selects its candidates
        best, best_idx, saw_nan = _scan(
            a_res, a_rows, row_in, b_base, sb_ptr, mb_ptr, base, 0, N, N, C, sac, sbp, sbc,
            best, best_idx, saw_nan, True, PREFETCH, HAS_MASK_B,
            BLOCK_M, BLOCK_N, BLOCK_K, SINGLE_K, EVEN_K, IS_F64, UPCAST, PRECISION)
    else:  # full tiles without any mask, then the ragged last one
        full = (N // BLOCK_N) * BLOCK_N
        best, best_idx, saw_nan = _scan(
            a_res, a_rows, row_in, b_base, sb_ptr, mb_ptr, base, 0, full, N, C, sac, sbp, sbc,
            best, best_idx, saw_nan, False, PREFETCH, HAS_MASK_B,
            BLOCK_M, BLOCK_N, BLOCK_K, SINGLE_K, EVEN_K, IS_F64, UPCAST, PRECISION)
        best, best_idx, saw_nan = _scan(
            a_res, a_rows, row_in, b_base, sb_ptr, mb_ptr, base, full, N, N, C, sac, sbp, sbc,
            best, best_idx, saw_nan, True, False, HAS_MASK_B,
            BLOCK_M, BLOCK_N, BLOCK_K, SINGLE_K, EVEN_K, IS_F64, UPCAST, PRECISION)

    # The rare rows are left to _dense_settle_kernel, marked in indices: a NaN maximum (NEEDS_NAN),
    # and, with a masked b, a row without a candidate above -inf or a non-finite query (scale NaN),
    # which take their first candidate (NEEDS_FIRST); without a mask that is candidate 0.
    sa = tl.load(sa_ptr + base + rows, mask=row_ok, other=0.0)
    to_first = (sa != sa) | ((best == float("-inf")) & (saw_nan == 0))
    if HAS_MASK_B:
        best_idx = tl.where(to_first, NEEDS_FIRST, tl.where(saw_nan != 0, NEEDS_NAN, best_idx))
    else:
        best_idx = tl.where(to_first, 0, tl.where(saw_nan != 0, NEEDS_NAN, best_idx))
    best = tl.where(saw_nan != 0, float("nan"), best)
    best_idx = tl.where(row_in, best_idx, -1)
    tl.store(values_ptr + base + rows, tl.where(row_in, tl.where(row_in, best, 0.0) * sa, 0.0), mask=row_ok)
    tl.store(indices_ptr + base + rows, best_idx.to(tl.int64), mask=row_ok)


@triton.jit
def _dense_settle_kernel(
    xa_ptr, xb_ptr, sb_ptr, mb_ptr, values_ptr, indices_ptr, sums_ptr, counts_ptr,
    N, C, sab, sap, sac, sbb, sbp, sbc,
    HAS_MASK_B: tl.constexpr, WRITE_LOSS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_K: tl.constexpr,
    EVEN_K: tl.constexpr, IS_F64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # The rows the scan marked, given torch.max's answers; a program whose rows hold no mark reads
    # its indices and stops. NEEDS_NAN: the first candidate whose similarity is NaN (the products of
    # the scan's own tile code). NEEDS_FIRST: the first candidate of b (its value, -inf or NaN, is
    # already stored), or none: value 0, index -1. With WRITE_LOSS the block's final values also
    # give its share of the loss (_loss.store_partial), at slot batch * programs + pid.
    # Grid: (cdiv(N, BLOCK_M), B).
    pid_m = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    base = batch * N
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    idx = tl.load(indices_ptr + base + rows, mask=row_ok, other=-1)
    needs_nan = idx == NEEDS_NAN
    needs_first = idx == NEEDS_FIRST
    values = tl.zeros([BLOCK_M], values_ptr.dtype.element_ty)
    if WRITE_LOSS:
        values = tl.load(values_ptr + base + rows, mask=row_ok, other=0.0)
    if tl.max(needs_nan.to(tl.int32), 0) > 0:
        a_rows = xa_ptr + batch * sab + rows.to(tl.int64)[:, None] * sap
        a_res = a_rows
        if SINGLE_K:
            a_res = resident_queries(a_rows, needs_nan, C, sac, BLOCK_K, UPCAST)
        first_nan = tl.full([BLOCK_M], NO_HIT, tl.int32)
        for start in range(0, N, BLOCK_N):
            acc, col_ok = _similarity_tile(a_res, a_rows, needs_nan, xb_ptr + batch * sbb, start, N, C, sac, sbp, sbc,
                                           mb_ptr, base, True, HAS_MASK_B, BLOCK_M, BLOCK_N, BLOCK_K, SINGLE_K,
                                           EVEN_K, IS_F64, UPCAST, PRECISION)
            cols = start + tl.arange(0, BLOCK_N)
            s = acc * tl.load(sb_ptr + base + cols, mask=col_ok, other=0.0)[None, :]
            first_nan = tl.minimum(first_nan, tl.min(tl.where((s != s) & col_ok[None, :], cols[None, :], NO_HIT), 1))
        tl.store(indices_ptr + base + rows, first_nan.to(tl.int64), mask=needs_nan)
        idx = tl.where(needs_nan, first_nan.to(tl.int64), idx)
    if HAS_MASK_B:
        if tl.max(needs_first.to(tl.int32), 0) > 0:
            first_col = NO_HIT
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                ok = (cols < N) & (tl.load(mb_ptr + base + cols, mask=cols < N, other=0) != 0)
                first_col = tl.minimum(first_col, tl.min(tl.where(ok, cols, NO_HIT), 0))
            none = first_col == NO_HIT
            settled = tl.where(none, -1, first_col).to(tl.int64) + tl.zeros_like(idx)
            tl.store(indices_ptr + base + rows, settled, mask=needs_first)
            idx = tl.where(needs_first, settled, idx)
            if none:
                tl.store(values_ptr + base + rows, tl.zeros([BLOCK_M], values_ptr.dtype.element_ty), mask=needs_first)
                values = tl.where(needs_first, 0.0, values)
    store_partial(values, row_ok & (idx >= 0), sums_ptr, counts_ptr, batch * tl.num_programs(0) + pid_m, WRITE_LOSS)


INTERPRETED = is_interpreted(_dense_match_fwd_kernel)

# Autotuned block sizes per shape class (N_CLASS, C, dtypes, flags). Prefetching configs keep two
# accumulators live: 128 x 64 tiles, so that both fit the register budget of two CTAs per SM; the
# 8-warp 128 x 128 config is capped at 128 registers for the same reason. Configs that do not fit
# a GPU's shared memory fail to compile and are skipped by the autotuner.
_TUNE_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "PREFETCH": True}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "PREFETCH": True}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "PREFETCH": True}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "PREFETCH": False}, num_warps=8, num_stages=2, maxnreg=128),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "PREFETCH": False}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "PREFETCH": False}, num_warps=4, num_stages=3),
]
# Float32 operands take twice the shared memory and, at float32 accuracy (three TF32 products per
# tile), about three times the product registers: smaller tiles, and no second accumulator (every
# prefetching float32 config spills at sm_90).
_TUNE_CONFIGS_FP32 = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "PREFETCH": False}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "PREFETCH": False}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "PREFETCH": False}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "PREFETCH": False}, num_warps=8, num_stages=2),
]
# True float32 products (set_float32_precision("ieee"), channels in 32-wide chunks): the same
# tiles less two that spill when masked: 128 x 32 on 8 warps (ptxas fits it in 128 registers only
# by spilling) and 64 x 64 on 4 (Triton 3.6: 9 local loads and stores at 168 registers). 128 x 64
# on 8 warps is the same work per thread.
_IEEE_SPILLING_TILES = ((128, 32), (64, 64))
_TUNE_CONFIGS_IEEE = [c for c in _TUNE_CONFIGS_FP32
                      if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) not in _IEEE_SPILLING_TILES]
_TUNE_KEY = ["N_CLASS", "C", "HAS_MASK_A", "HAS_MASK_B", "BLOCK_K", "IS_F64", "PRECISION"]
_TUNED_KERNEL = None if INTERPRETED else triton.autotune(configs=_TUNE_CONFIGS, key=_TUNE_KEY)(_dense_match_fwd_kernel)
_TUNED_KERNEL_FP32 = None if INTERPRETED else triton.autotune(
    configs=_TUNE_CONFIGS_FP32, key=_TUNE_KEY)(_dense_match_fwd_kernel)
_TUNED_KERNEL_IEEE = None if INTERPRETED else triton.autotune(
    configs=_TUNE_CONFIGS_IEEE, key=_TUNE_KEY)(_dense_match_fwd_kernel)

#: Below this many pixels per map a fixed tile is used (no autotuning: small maps are launch-bound).
#: At and above it every tuned tile (BLOCK_N <= 128) has a full tile to prefetch.
AUTOTUNE_MIN_PIXELS = 4096


def shape_class(n: int) -> int:
    """The autotuner's bucket for N: the power of two at or above it."""
    return next_power_of_2(n)


def block_k(C: int, is_f64: bool) -> int:
    """Width of the channel chunk: all of C (>= 16 for ``tl.dot``) up to 128, else 32-wide chunks
    (the queries' chunk is reloaded beside the candidates', in registers: 64 spilled at sm_90)."""
    if is_f64:
        return min(next_power_of_2(C), 16)
    padded = max(16, next_power_of_2(C))
    return padded if padded <= 128 else 32


def fixed_blocks(N: int, is_f64: bool, interpreted: bool):
    """(BLOCK_M, BLOCK_N) without autotuning: small tiles for small maps, float64 and the interpreter.

    The interpreter takes 32 x 32 (numpy is fast per op, slow per op count); a GPU takes up to
    64 x 64, or 16 x 16 in float64, whose tiles are a (BLOCK_M, BLOCK_N, BLOCK_K) product in registers.
    """
    largest = 32 if interpreted else (16 if is_f64 else 64)
    tile = min(largest, max(16, next_power_of_2(N)))
    return tile, tile


def prefetches(N: int, BLOCK_N: int, has_mask_b: bool, single_k: bool, is_f64: bool) -> bool:
    """Whether the scan issues each tile's product ahead of the previous tile's epilogue: on the
    tensor-core path (channels resident), when there is a tile to start with (a full one, or any
    tile of a masked ``b``)."""
    return single_k and not is_f64 and (has_mask_b or N >= BLOCK_N)


def _settle_grid(N: int, B: int, is_f64: bool):
    BLOCK_M, _ = fixed_blocks(N, is_f64, INTERPRETED)
    return (triton.cdiv(N, BLOCK_M), B)


def loss_slots(N: int, B: int, dtype: torch.dtype) -> int:
    """Programs of the pass that writes the loss's partial sums (the settle pass): its slots."""
    programs, batch = _settle_grid(N, B, dtype == torch.float64)
    return programs * batch


def dense_match_forward(xa, xb, scale_a, scale_b, mask_a, mask_b, partials=None, out=None):
    """Launch the dense kernel; returns ``(values, indices)``, each (B, N).

    ``partials``: ``(sums, counts)`` of :func:`loss_slots` slots each, which then receive the loss's
    partial sums (:mod:`._loss`); ``out``: ``(values, indices)`` to write instead of new tensors.

    Shapes: ``xa``, ``xb`` voxel-major (B, N, C), best with the channels innermost (K-major
    ``tl.dot`` operands: the op passes the rows of :func:`.prepare.prepare_features`); scales (B, N)
    float32 (float64 for float64); masks None or bool with B * N elements. The caller (the op) has
    checked the contract.
    """
    B, N, C = xa.shape
    flags = feature_flags(xa.dtype, xa.device, INTERPRETED)
    is_f64 = flags["IS_F64"]
    if out is None:
        out = (torch.empty((B, N), dtype=scale_a.dtype, device=xa.device),
               torch.empty((B, N), dtype=torch.int64, device=xa.device))
    values, indices = out
    sums, counts = partials if partials is not None else (values, indices)  # not read without partials
    BLOCK_K = block_k(C, is_f64)
    if flags["PRECISION"] == "ieee" and xa.dtype == torch.float32 and not INTERPRETED:
        # True float32 products run on the CUDA cores with both operand tiles in registers: the
        # channels in 32-wide chunks, or every tile spills at sm_90.
        BLOCK_K = min(BLOCK_K, 32)
    args = (
        xa, xb, scale_a, scale_b, mask_pointer(mask_a, values), mask_pointer(mask_b, values),
        values, indices, N, C, *xa.stride(), *xb.stride(), shape_class(N),
    )
    constants = dict(
        HAS_MASK_A=mask_a is not None, HAS_MASK_B=mask_b is not None,
        BLOCK_K=BLOCK_K, SINGLE_K=C <= BLOCK_K, EVEN_K=C == BLOCK_K, **flags,
    )
    BLOCK_M, BLOCK_N = fixed_blocks(N, is_f64, INTERPRETED)  # the settle pass's, and small maps' scan
    if _TUNED_KERNEL is not None and not is_f64 and N >= AUTOTUNE_MIN_PIXELS:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B)  # noqa: E731
        if xa.dtype != torch.float32:
            tuned = _TUNED_KERNEL
        else:
            tuned = _TUNED_KERNEL_IEEE if flags["PRECISION"] == "ieee" else _TUNED_KERNEL_FP32
        tuned[grid](*args, **constants)
    else:
        grid = (triton.cdiv(N, BLOCK_M), B)
        _dense_match_fwd_kernel[grid](
            *args, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            PREFETCH=prefetches(N, BLOCK_N, mask_b is not None, C <= BLOCK_K, is_f64), **constants,
        )
    # The marked rows (rare: NaN maxima, masked rows without a finite candidate); a program
    # without any reads its indices (and, for the loss, its values) and stops.
    _dense_settle_kernel[_settle_grid(N, B, is_f64)](
        xa, xb, scale_b, mask_pointer(mask_b, values), values, indices, sums, counts,
        N, C, *xa.stride(), *xb.stride(),
        HAS_MASK_B=mask_b is not None, WRITE_LOSS=partials is not None,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        SINGLE_K=C <= BLOCK_K, EVEN_K=C == BLOCK_K, **flags,
        num_stages=1,  # the rare path: no buffers for a pipeline
    )
    return values, indices


def dense_match_symmetric_forward(xa, xb, scale_a, scale_b, mask_a, mask_b):
    """Both directions: ``(values_ab, indices_ab, values_ba, indices_ba)``.

    a -> b as :func:`dense_match_forward`, b -> a the same scan with the roles (and masks) swapped,
    on the rows and scales prepared once for both. No memory beyond the outputs.
    """
    values_ab, indices_ab = dense_match_forward(xa, xb, scale_a, scale_b, mask_a, mask_b)
    values_ba, indices_ba = dense_match_forward(xb, xa, scale_b, scale_a, mask_b, mask_a)
    return values_ab, indices_ab, values_ba, indices_ba
