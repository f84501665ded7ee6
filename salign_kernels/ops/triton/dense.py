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

from ._argmax import NO_HIT, block_argmax, fold_best
from ._runtime import feature_flags, is_interpreted, mask_pointer, next_power_of_2


@triton.jit
def _similarity_tile(
    a_res, a_rows, row_in, b_base, cols, col_ok, C, sac, sbp, sbc,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_K: tl.constexpr,
    IS_F64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """``<xa_p, xb_q>`` for a tile of queries (rows) and candidates (``cols``), in float32 (float64).

    Candidates outside ``col_ok`` load as zeros: no NaN of theirs can reach a product.
    """
    ks = tl.arange(0, BLOCK_K)
    b_rows = b_base + cols.to(tl.int64)[:, None] * sbp
    if SINGLE_K and not IS_F64:
        # No channel loop: the scan over candidate tiles is then the innermost loop, which Triton
        # software-pipelines (the next tile's load overlaps this tile's product and epilogue).
        bt = tl.load(b_rows + ks.to(tl.int64)[None, :] * sbc, mask=col_ok[:, None] & (ks < C)[None, :], other=0.0)
        if UPCAST:
            bt = bt.to(tl.float32)
        acc = tl.dot(a_res, tl.trans(bt), input_precision=PRECISION)
    else:
        if IS_F64:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float64)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, C, BLOCK_K):
            kk = k0 + ks
            if SINGLE_K:
                a = a_res
            else:
                a = tl.load(a_rows + kk.to(tl.int64)[None, :] * sac, mask=row_in[:, None] & (kk < C)[None, :],
                            other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
            bt = tl.load(b_rows + kk.to(tl.int64)[None, :] * sbc, mask=col_ok[:, None] & (kk < C)[None, :], other=0.0)
            if UPCAST:
                bt = bt.to(tl.float32)
            if IS_F64:
                acc += tl.sum(a[:, None, :] * bt[None, :, :], axis=2)
            else:
                acc = tl.dot(a, tl.trans(bt), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _candidate_tile(
    a_res, a_rows, row_in, b_base, sb_ptr, mb_ptr, base, start, N, C, sac, sbp, sbc,
    HAS_MASK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SINGLE_K: tl.constexpr, IS_F64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """The candidate tile starting at ``start``: ``(cols, col_ok, acc, scaled, sb)`` with ``acc``
    the products ``<xa_p, xb_q>``, ``sb`` the candidates' scales and ``scaled = acc * sb[q]`` (not yet
    masked: see ``col_ok``)."""
    cols = start + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_MASK_B:
        col_ok = col_ok & (tl.load(mb_ptr + base + cols, mask=col_ok, other=0) != 0)
    acc = _similarity_tile(a_res, a_rows, row_in, b_base, cols, col_ok, C, sac, sbp, sbc,
                           BLOCK_M, BLOCK_N, BLOCK_K, SINGLE_K, IS_F64, UPCAST, PRECISION)
    sb = tl.load(sb_ptr + base + cols, mask=col_ok, other=0.0)
    return cols, col_ok, acc, acc * sb[None, :], sb


@triton.jit
def _max_keep_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _dense_match_fwd_kernel(
    xa_ptr, xb_ptr, sa_ptr, sb_ptr, ma_ptr, mb_ptr, values_ptr, indices_ptr,
    part_val_ptr, part_idx_ptr,  # column partials of the symmetric pass (B, cdiv(N, BLOCK_M), N)
    N, C,
    sab, sap, sac, sbb, sbp, sbc,  # strides of xa and xb: batch, pixel, channel
    N_CLASS,  # shape class of N, only read by the autotuner's key
    HAS_MASK_A: tl.constexpr, HAS_MASK_B: tl.constexpr, SYMMETRIC: tl.constexpr,
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
    # One-way: per tile, a NaN-propagating row max, then the lowest column at it (two reductions).
    # A row whose max came out NaN (a NaN similarity: torch.max returns it, at its first index) is
    # rare, so it is settled after the scan by a second pass over the block's tiles that looks
    # for the first NaN, run only when some row of the block needs it.
    #
    # SYMMETRIC also takes the direction b -> a from the same tiles: <xa_p, xb_q> is symmetric, so
    # each tile's column maxima of sa[p] * <xa_p, xb_q> over its BLOCK_M rows (queries q of b,
    # candidates p of a) are stored as partials, which _column_reduce_kernel combines across the
    # row blocks in increasing order, then multiplies by sb[q]. The gradient of that direction is
    # the same formula with a and b swapped.
    #
    # Layout: x*_ptr (B, N, C) through their strides (pixel-major or channel-major alike),
    # s*_ptr / m*_ptr / values / indices (B, N) contiguous. Grid: (cdiv(N, BLOCK_M), B).
    pid_m = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    base = batch * N  # int64: B * N * C may exceed 2**31
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    ks = tl.arange(0, BLOCK_K)
    a_rows = xa_ptr + batch * sab + rows.to(tl.int64)[:, None] * sap
    b_base = xb_ptr + batch * sbb
    # Pixels of a that take part: as queries here, and as candidates of b's queries when SYMMETRIC.
    row_in = row_ok
    if HAS_MASK_A:
        row_in = row_in & (tl.load(ma_ptr + base + rows, mask=row_ok, other=0) != 0)
    if SYMMETRIC:
        sa_rows = tl.load(sa_ptr + base + rows, mask=row_in, other=0.0)
        first_row = tl.min(tl.where(row_in, rows, NO_HIT), 0)  # a non-finite query of b takes it

    a_res = a_rows  # placeholder when the channels come in chunks
    if SINGLE_K:  # the whole C-vector of every query stays resident for the entire scan
        a_res = tl.load(a_rows + ks.to(tl.int64)[None, :] * sac, mask=row_in[:, None] & (ks < C)[None, :], other=0.0)
        if UPCAST:
            a_res = a_res.to(tl.float32)

    if IS_F64:
        best = tl.full([BLOCK_M], float("-inf"), tl.float64)
    else:
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK_M], -1, tl.int32)
    saw_nan = tl.zeros([BLOCK_M], tl.int32)
    first_col = NO_HIT  # the lowest candidate: where a non-finite query (scale NaN) goes, as in torch.max

    for start in range(0, N, BLOCK_N):
        cols, col_ok, acc, scaled, sb = _candidate_tile(
            a_res, a_rows, row_in, b_base, sb_ptr, mb_ptr, base, start, N, C, sac, sbp, sbc,
            HAS_MASK_B, BLOCK_M, BLOCK_N, BLOCK_K, SINGLE_K, IS_F64, UPCAST, PRECISION)
        s = tl.where(col_ok[None, :], scaled, float("-inf"))  # (BLOCK_M, BLOCK_N)
        first_col = tl.minimum(first_col, tl.min(tl.where(col_ok, cols, NO_HIT), 0))

        if SYMMETRIC:
            # Row max and the lowest column attaining it (NaN wins, as in torch.max), merged into
            # the running best: strictly greater wins, so earlier tiles (lower indices) keep ties.
            top, arg, is_nan, first_ok = block_argmax(s, cols[None, :], col_ok[None, :], 1)
            best, best_idx = fold_best(best, best_idx, top, arg, is_nan, first_ok)
            # The same reduction down the columns: queries q of b, candidates p of a. Rows that
            # are no candidate are -inf, whatever acc holds (a NaN query times a masked zero row is
            # NaN); a non-finite query of b (scale NaN) takes the block's first candidate, NaN.
            t = tl.where(row_in[:, None], acc * sa_rows[:, None], float("-inf"))
            col_max, col_arg, _, _ = block_argmax(t, rows[:, None], row_in[:, None], 0)  # NO_HIT: no row
            col_bad = (sb != sb) & (first_row < NO_HIT)
            col_max = tl.where(col_bad, float("nan"), col_max)
            col_arg = tl.where(col_bad, first_row, col_arg)
            part = (batch * tl.num_programs(0) + pid_m) * N + cols
            tl.store(part_val_ptr + part, col_max, mask=cols < N)
            tl.store(part_idx_ptr + part, col_arg, mask=cols < N)
        else:
            top = tl.reduce(s, 1, _max_keep_nan)  # NaN if the row holds one
            arg = tl.min(tl.where((s == top[:, None]) & col_ok[None, :], cols[None, :], NO_HIT), 1)
            saw_nan = saw_nan | (top != top).to(tl.int32)
            # Strictly greater wins, so earlier tiles (lower indices) keep ties; a query without a
            # best yet takes a tile's best real candidate even at -inf.
            better = (top > best) | ((best_idx < 0) & (arg < NO_HIT))
            best = tl.where(better, top, best)
            best_idx = tl.where(better, arg, best_idx)

    if not SYMMETRIC:
        if tl.max(saw_nan, 0) > 0:  # the first NaN of each row that holds one: torch.max's answer
            first_nan = tl.full([BLOCK_M], NO_HIT, tl.int32)
            for start in range(0, N, BLOCK_N):
                cols, col_ok, _, s, _ = _candidate_tile(
                    a_res, a_rows, row_in, b_base, sb_ptr, mb_ptr, base, start, N, C, sac, sbp, sbc,
                    HAS_MASK_B, BLOCK_M, BLOCK_N, BLOCK_K, SINGLE_K, IS_F64, UPCAST, PRECISION)
                first_nan = tl.minimum(first_nan, tl.min(tl.where((s != s) & col_ok[None, :], cols[None, :], NO_HIT), 1))
            has_nan = (saw_nan != 0) & (first_nan < NO_HIT)
            best = tl.where(has_nan, float("nan"), best)
            best_idx = tl.where(has_nan, first_nan, best_idx)

    sa = tl.load(sa_ptr + base + rows, mask=row_ok, other=0.0)
    best_idx = tl.where((sa != sa) & (first_col < NO_HIT), first_col, best_idx)
    valid = row_in & (best_idx >= 0)
    tl.store(values_ptr + base + rows, tl.where(valid, tl.where(valid, best, 0.0) * sa, 0.0), mask=row_ok)
    tl.store(indices_ptr + base + rows, tl.where(valid, best_idx, -1).to(tl.int64), mask=row_ok)


@triton.jit
def _column_reduce_kernel(
    part_val_ptr, part_idx_ptr, sb_ptr, mb_ptr, values_ptr, indices_ptr,
    N, NUM_BLOCKS,
    HAS_MASK_B: tl.constexpr, BLOCK: tl.constexpr, IS_F64: tl.constexpr,
):
    # values_ba[q] = sb[q] * max over row blocks of the partial max_p sa[p] <xa_p, xb_q>, and its
    # lowest p: blocks are read in increasing row order and a later one wins only when strictly
    # greater (NaN beats any number, the first NaN stays). No gradient flows here: the indices
    # are saved and the backward op differentiates values_ba like any one-way match.
    # Grid: (cdiv(N, BLOCK), B).
    batch = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < N
    if IS_F64:
        best = tl.full([BLOCK], float("-inf"), tl.float64)
    else:
        best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK], -1, tl.int32)
    for m in range(0, NUM_BLOCKS):
        part = (batch * NUM_BLOCKS + m) * N + cols
        v = tl.load(part_val_ptr + part, mask=col_ok, other=float("-inf"))
        i = tl.load(part_idx_ptr + part, mask=col_ok, other=NO_HIT)
        has = i != NO_HIT
        better = (v > best) | ((v != v) & (best == best)) | (best_idx < 0)
        better = better & has
        best = tl.where(better, v, best)
        best_idx = tl.where(better, i, best_idx)
    valid = col_ok & (best_idx >= 0)
    if HAS_MASK_B:
        valid = valid & (tl.load(mb_ptr + batch * N + cols, mask=col_ok, other=0) != 0)
    sb = tl.load(sb_ptr + batch * N + cols, mask=col_ok, other=0.0)
    value = tl.where(valid, tl.where(valid, best, 0.0) * sb, 0.0)
    tl.store(values_ptr + batch * N + cols, value, mask=col_ok)
    tl.store(indices_ptr + batch * N + cols, tl.where(valid, best_idx, -1).to(tl.int64), mask=col_ok)


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


def _symmetric_configs(block_m: int):
    return [
        triton.Config({"BLOCK_M": block_m, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": block_m, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": block_m, "BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": block_m, "BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": block_m, "BLOCK_N": 32}, num_warps=4, num_stages=1),
    ]


# The symmetric pass fixes BLOCK_M, which sizes its partials: 128 rows for half features, 64 for
# float32 (its tiles take twice the shared memory). The rest is autotuned as above.
_TUNED_SYMMETRIC = None if INTERPRETED else {
    block_m: triton.autotune(
        configs=_symmetric_configs(block_m),
        key=["N_CLASS", "C", "HAS_MASK_A", "HAS_MASK_B", "BLOCK_K", "IS_F64", "PRECISION"],
    )(_dense_match_fwd_kernel)
    for block_m in (64, 128)
}

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
    """(BLOCK_M, BLOCK_N) without autotuning: small tiles for small maps, float64 and the interpreter.

    The interpreter takes 32 x 32 (numpy is fast per op, slow per op count); a GPU takes up to
    64 x 64, or 16 x 16 in float64, whose tiles are a (BLOCK_M, BLOCK_N, BLOCK_K) product in registers.
    """
    largest = 32 if interpreted else (16 if is_f64 else 64)
    tile = min(largest, max(16, next_power_of_2(N)))
    return tile, tile


def _launch_arguments(xa, xb, scale_a, scale_b, mask_a, mask_b, values, indices, part_val, part_idx,
                      flags, symmetric: bool):
    """The dense kernel's positional arguments and compile-time constants, block sizes aside."""
    _, N, C = xa.shape
    BLOCK_K = block_k(C, flags["IS_F64"])
    args = (
        xa, xb, scale_a, scale_b, mask_pointer(mask_a, values), mask_pointer(mask_b, values),
        values, indices, part_val, part_idx, N, C, *xa.stride(), *xb.stride(), shape_class(N),
    )
    constants = dict(
        HAS_MASK_A=mask_a is not None, HAS_MASK_B=mask_b is not None, SYMMETRIC=symmetric,
        BLOCK_K=BLOCK_K, SINGLE_K=C <= BLOCK_K, **flags,
    )
    return args, constants


def dense_match_forward(xa, xb, scale_a, scale_b, mask_a, mask_b):
    """Launch the dense kernel; returns ``(values, indices)``, each (B, N).

    Shapes: ``xa``, ``xb`` voxel-major (B, N, C), best with the channels innermost (K-major
    ``tl.dot`` operands: the op passes the rows of :func:`.prepare.prepare_features`); scales (B, N)
    float32 (float64 for float64); masks None or bool with B * N elements. The caller (the op) has
    checked the contract.
    """
    B, N, C = xa.shape
    flags = feature_flags(xa.dtype, xa.device, INTERPRETED)
    values = torch.empty((B, N), dtype=scale_a.dtype, device=xa.device)
    indices = torch.empty((B, N), dtype=torch.int64, device=xa.device)
    # The partials are not written on the one-way path: values and indices stand in for them.
    args, constants = _launch_arguments(xa, xb, scale_a, scale_b, mask_a, mask_b, values, indices,
                                        values, indices, flags, symmetric=False)
    if _TUNED_KERNEL is not None and not flags["IS_F64"] and N >= AUTOTUNE_MIN_PIXELS:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B)  # noqa: E731
        _TUNED_KERNEL[grid](*args, **constants)
    else:
        BLOCK_M, BLOCK_N = fixed_blocks(N, flags["IS_F64"], INTERPRETED)
        grid = (triton.cdiv(N, BLOCK_M), B)
        _dense_match_fwd_kernel[grid](*args, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **constants)
    return values, indices


def symmetric_block_m(N: int, dtype: torch.dtype, interpreted: bool) -> int:
    """Rows per program of the symmetric pass: they size its column partials (B, cdiv(N, BLOCK_M), N)."""
    is_f64 = dtype == torch.float64
    if interpreted or is_f64 or N < AUTOTUNE_MIN_PIXELS:
        return fixed_blocks(N, is_f64, interpreted)[0]
    return 64 if dtype == torch.float32 else 128


def symmetric_partial_bytes(B: int, N: int, dtype: torch.dtype) -> int:
    """Bytes of the column partials of the fused symmetric pass: a value and an int32 index per
    row block and pixel."""
    blocks = triton.cdiv(N, symmetric_block_m(N, dtype, INTERPRETED))
    return B * blocks * N * ((8 if dtype == torch.float64 else 4) + 4)


def dense_match_symmetric_forward(xa, xb, scale_a, scale_b, mask_a, mask_b):
    """Both directions from one pass over the tiles: ``(values_ab, indices_ab, values_ba, indices_ba)``.

    a -> b as :func:`dense_match_forward`; b -> a (queries in b, candidates in a, masks swapped)
    from per-tile column maxima, reduced across the row blocks by ``_column_reduce_kernel``.
    Extra memory: the partials, ``B * cdiv(N, BLOCK_M) * N`` values and indices.
    """
    B, N, C = xa.shape
    flags = feature_flags(xa.dtype, xa.device, INTERPRETED)
    values = torch.empty((B, N), dtype=scale_a.dtype, device=xa.device)
    indices = torch.empty((B, N), dtype=torch.int64, device=xa.device)
    values_ba = torch.empty_like(values)
    indices_ba = torch.empty_like(indices)
    BLOCK_M = symmetric_block_m(N, xa.dtype, INTERPRETED)
    num_blocks = triton.cdiv(N, BLOCK_M)
    part_val = torch.empty((B, num_blocks, N), dtype=scale_a.dtype, device=xa.device)
    part_idx = torch.empty((B, num_blocks, N), dtype=torch.int32, device=xa.device)
    args, constants = _launch_arguments(xa, xb, scale_a, scale_b, mask_a, mask_b, values, indices,
                                        part_val, part_idx, flags, symmetric=True)
    grid = (num_blocks, B)
    if _TUNED_SYMMETRIC is not None and BLOCK_M in _TUNED_SYMMETRIC and N >= AUTOTUNE_MIN_PIXELS:
        _TUNED_SYMMETRIC[BLOCK_M][grid](*args, **constants)
    else:
        BLOCK_N = fixed_blocks(N, flags["IS_F64"], INTERPRETED)[1]
        _dense_match_fwd_kernel[grid](*args, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **constants)
    REDUCE = 64 if INTERPRETED else 256
    _column_reduce_kernel[(triton.cdiv(N, REDUCE), B)](
        part_val, part_idx, scale_b, mask_pointer(mask_b, values), values_ba, indices_ba,
        N, num_blocks,
        HAS_MASK_B=mask_b is not None, BLOCK=REDUCE, IS_F64=flags["IS_F64"],
    )
    return values, indices, values_ba, indices_ba
