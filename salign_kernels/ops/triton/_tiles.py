"""The tile products of the forward kernels, shared by the dense and the window scans.

``@triton.jit`` helpers, inlined into each kernel: a block of ``BLOCK_M`` queries against a block of
``BLOCK_N`` candidate rows, ``acc[i, j] = <xa_i, xb_j>`` in float32 (float64), through ``tl.dot``
on the tensor cores (float64: a broadcast product on the CUDA cores, for gradcheck). The dense scan
reads consecutive candidates, the window scan the rows of a box around its query tile: both hand
over a pointer per candidate row.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def resident_queries(a_rows, rows_in, C, sac, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """The whole C-vector of every query of the block, zeros for the rows not in ``rows_in``: it
    stays resident for the entire scan (``SINGLE_K``)."""
    ks = tl.arange(0, BLOCK_K)
    a = tl.load(a_rows + ks.to(tl.int64)[None, :] * sac, mask=rows_in[:, None] & (ks < C)[None, :], other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
    return a


@triton.jit
def tile_product(
    a_res, a_rows, row_in, b_rows, col_ok, C, sac, sbc,
    MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SINGLE_K: tl.constexpr, EVEN_K: tl.constexpr, IS_F64: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``acc[i, j] = <xa_i, xb_j>``, ``(BLOCK_M, BLOCK_N)`` in float32 (float64).

    ``a_res``: the resident queries (``SINGLE_K``), else ``a_rows`` ``(BLOCK_M, 1)`` pointers whose
    rows in ``row_in`` load a chunk at a time. ``b_rows``: ``(BLOCK_N, 1)`` pointers to the
    candidates' rows. ``MASKED``: rows not in ``col_ok`` load as zeros (no NaN of theirs reaches a
    product; the caller selects through ``col_ok``); otherwise every candidate row is real and only
    the channel tail (``not EVEN_K``) is predicated.
    """
    ks = tl.arange(0, BLOCK_K)
    if SINGLE_K and not IS_F64:
        # No channel loop: the scan over candidate tiles is the innermost loop, which Triton
        # software-pipelines (the next tiles' loads overlap this tile's product and epilogue).
        ptrs = b_rows + ks.to(tl.int64)[None, :] * sbc
        if MASKED:
            bt = tl.load(ptrs, mask=col_ok[:, None] & (ks < C)[None, :], other=0.0)
        elif EVEN_K:
            bt = tl.load(ptrs)
        else:
            bt = tl.load(ptrs, mask=(ks < C)[None, :], other=0.0)
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
            if MASKED:
                chunk_ok = col_ok[:, None] & (kk < C)[None, :]
            else:
                chunk_ok = (kk < C)[None, :]
            bt = tl.load(b_rows + kk.to(tl.int64)[None, :] * sbc, mask=chunk_ok, other=0.0)
            if UPCAST:
                bt = bt.to(tl.float32)
            if IS_F64:
                acc += tl.sum(a[:, None, :] * bt[None, :, :], axis=2)
            else:
                acc = tl.dot(a, tl.trans(bt), acc, input_precision=PRECISION)
    return acc
