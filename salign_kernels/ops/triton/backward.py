"""Backward of every matching (dense and windowed): gather and scatter through the saved indices.

Kernels -> launcher. The forward pass saved, per query p, the index q = indices[p] of its best
candidate; the gradient touches only those pairs, O(B N C) work and memory instead of the
O(B N^2 C) of differentiating the similarity matrix.

- The gather kernel (one program per ``BLOCK_P`` queries) writes ``grad_xa`` and ``grad_scale_a``
  and, on the fast path, scatter-adds each query's contribution to ``grad_xb``/``grad_scale_b``
  with float32 atomics (float64 for float64): the order of the additions, so the last bits of the
  result, may vary between runs.
- When ``torch.are_deterministic_algorithms_enabled()``, the gather kernel stores each query's two
  coefficients instead, the queries are sorted by target (a stable sort: an inverse index of
  contiguous segments), and one program per target q sums its segment in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import is_interpreted, next_power_of_2


@triton.jit
def _match_bwd_gather_kernel(
    g_ptr, xa_ptr, xb_ptr, sa_ptr, sb_ptr, idx_ptr,
    gxa_ptr, gsa_ptr, gxb_ptr, gsb_ptr, coef_ptr, coef_s_ptr,
    N, C,
    ATOMIC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE_C: tl.constexpr,
    IS_F64: tl.constexpr,
):
    # Gradient of  values[p] = sa[p] * sb[q] * d_p,  q = indices[p],  d_p = <xa_p, xb_q>,
    # with upstream g_p = grad_values[p] (0 for an invalid query, q = -1):
    #   grad_xa[p] = g_p sa[p] sb[q] xb_q                 = coef_p xb_q       (gather, here)
    #   grad_sa[p] = g_p sb[q] d_p                                            (here)
    #   grad_xb[q] = sum_{p: indices[p] = q} coef_p xa_p,  coef_p = g_p sa[p] sb[q]   (scatter)
    #   grad_sb[q] = sum_{p: indices[p] = q} g_p sa[p] d_p = sum coef_s_p             (scatter)
    # Layout: x* (B, N, C), everything else (B, N). Grid: (cdiv(N, BLOCK_P), B).
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    base = batch * N
    rows = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    row_ok = rows < N
    q = tl.load(idx_ptr + base + rows, mask=row_ok, other=-1)
    valid = row_ok & (q >= 0) & (q < N)  # out-of-range indices are treated as "no match"
    q = tl.where(valid, q, 0)
    g = tl.load(g_ptr + base + rows, mask=valid, other=0.0)
    sa = tl.load(sa_ptr + base + rows, mask=valid, other=0.0)
    sb = tl.load(sb_ptr + base + q, mask=valid, other=0.0)
    a_rows = xa_ptr + (base + rows.to(tl.int64))[:, None] * C
    b_rows = xb_ptr + (base + q)[:, None] * C
    cs = tl.arange(0, BLOCK_C)

    if IS_F64:
        d = tl.zeros([BLOCK_P], tl.float64)
    else:
        d = tl.zeros([BLOCK_P], tl.float32)
    if SINGLE_C:
        both = valid[:, None] & (cs < C)[None, :]
        a_res = tl.load(a_rows + cs[None, :], mask=both, other=0.0).to(d.dtype)
        b_res = tl.load(b_rows + cs[None, :], mask=both, other=0.0).to(d.dtype)
        d = tl.sum(a_res * b_res, axis=1)
    else:
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cs
            both = valid[:, None] & (cc < C)[None, :]
            a = tl.load(a_rows + cc[None, :], mask=both, other=0.0).to(d.dtype)
            b = tl.load(b_rows + cc[None, :], mask=both, other=0.0).to(d.dtype)
            d += tl.sum(a * b, axis=1)

    coef = g * sa * sb
    coef_s = g * sa * d
    tl.store(gsa_ptr + base + rows, g * sb * d, mask=row_ok)
    if ATOMIC:
        tl.atomic_add(gsb_ptr + base + q, coef_s, mask=valid)
    else:
        tl.store(coef_ptr + base + rows, coef, mask=row_ok)
        tl.store(coef_s_ptr + base + rows, coef_s, mask=row_ok)

    ga_rows = gxa_ptr + (base + rows.to(tl.int64))[:, None] * C
    gb_rows = gxb_ptr + (base + q)[:, None] * C
    if SINGLE_C:
        store_mask = row_ok[:, None] & (cs < C)[None, :]
        tl.store(ga_rows + cs[None, :], (coef[:, None] * b_res).to(gxa_ptr.dtype.element_ty), mask=store_mask)
        if ATOMIC:
            both = valid[:, None] & (cs < C)[None, :]
            tl.atomic_add(gb_rows + cs[None, :], coef[:, None] * a_res, mask=both)
    else:
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cs
            both = valid[:, None] & (cc < C)[None, :]
            b = tl.load(b_rows + cc[None, :], mask=both, other=0.0).to(d.dtype)
            store_mask = row_ok[:, None] & (cc < C)[None, :]
            tl.store(ga_rows + cc[None, :], (coef[:, None] * b).to(gxa_ptr.dtype.element_ty), mask=store_mask)
            if ATOMIC:
                a = tl.load(a_rows + cc[None, :], mask=both, other=0.0).to(d.dtype)
                tl.atomic_add(gb_rows + cc[None, :], coef[:, None] * a, mask=both)


@triton.jit
def _match_bwd_scatter_sorted_kernel(
    xa_ptr, order_ptr, seg_ptr, coef_ptr, coef_s_ptr, gxb_ptr, gsb_ptr,
    C,
    BLOCK_C: tl.constexpr, IS_F64: tl.constexpr,
):
    # The deterministic scatter of the gather kernel's formulas:
    #   grad_xb[t] = sum_{i in seg[t] .. seg[t+1]-1} coef[order[i]] xa[order[i]]
    #   grad_sb[t] = sum_{same i} coef_s[order[i]]
    # over flat pixel indices t = b * N + q; order lists the queries sorted (stably) by target, so
    # each sum runs in increasing p. Grid: (B * N,).
    t = tl.program_id(0).to(tl.int64)
    start = tl.load(seg_ptr + t)
    end = tl.load(seg_ptr + t + 1)
    cs = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cs
        if IS_F64:
            acc = tl.zeros([BLOCK_C], tl.float64)
            acc_s = tl.zeros([BLOCK_C], tl.float64)
        else:
            acc = tl.zeros([BLOCK_C], tl.float32)
            acc_s = tl.zeros([BLOCK_C], tl.float32)
        for i in range(start, end):
            p = tl.load(order_ptr + i)
            x = tl.load(xa_ptr + p * C + cc, mask=cc < C, other=0.0).to(acc.dtype)
            acc += tl.load(coef_ptr + p) * x
            acc_s += tl.load(coef_s_ptr + p)  # the same scalar sum in every lane
        tl.store(gxb_ptr + t * C + cc, acc.to(gxb_ptr.dtype.element_ty), mask=cc < C)
        tl.store(gsb_ptr + t + cs * 0, acc_s, mask=cs == 0)


INTERPRETED = is_interpreted(_match_bwd_gather_kernel)


def block_c(C: int) -> int:
    """Channel chunk: all of C up to 128, else 64-wide chunks."""
    padded = next_power_of_2(C)
    return padded if padded <= 128 else 64


def inverse_index(indices: torch.Tensor):
    """``(order, segments)``: the queries grouped by target, for the deterministic scatter.

    Flat targets ``t = b * N + q`` of the valid queries (invalid ones sort last, past ``B * N``);
    ``order`` lists flat query indices sorted stably by target, and the queries that chose target
    ``t`` are ``order[segments[t]:segments[t + 1]]``, in increasing order. No host synchronisation.
    """
    B, H, W = indices.shape
    N = H * W
    flat = indices.reshape(B, N)
    offsets = torch.arange(B, device=indices.device, dtype=torch.int64)[:, None] * N
    keys = torch.where((flat >= 0) & (flat < N), flat + offsets, B * N).reshape(-1)
    sorted_keys, order = torch.sort(keys, stable=True)
    targets = torch.arange(B * N + 1, device=indices.device, dtype=torch.int64)
    segments = torch.searchsorted(sorted_keys, targets)
    return order.contiguous(), segments.contiguous()


def match_backward(grad_values, xa, xb, scale_a, scale_b, indices):
    """Launch the backward kernels: ``(grad_xa, grad_xb, grad_scale_a, grad_scale_b)``.

    Shapes: ``grad_values``, scales, ``indices`` (B, H, W); ``xa``, ``xb`` (B, H, W, C), contiguous.
    Feature gradients come back in the features' dtype, scale gradients in the scales' dtype.
    """
    B, H, W, C = xa.shape
    N = H * W
    acc_dtype = scale_a.dtype
    is_f64 = xa.dtype == torch.float64
    atomic = not torch.are_deterministic_algorithms_enabled()
    grad_xa = torch.empty_like(xa)
    grad_sa = torch.empty_like(scale_a)
    if atomic:
        grad_xb_acc = torch.zeros(xb.shape, dtype=acc_dtype, device=xb.device)
        grad_sb = torch.zeros_like(scale_b)
        coef = coef_s = grad_sa  # not read on this path
    else:
        grad_xb_acc, grad_sb = grad_xa, grad_sa  # not written on this path
        coef = torch.empty((B, N), dtype=acc_dtype, device=xa.device)
        coef_s = torch.empty((B, N), dtype=acc_dtype, device=xa.device)
    BLOCK_C = block_c(C)
    BLOCK_P = 16 if INTERPRETED else max(16, min(64, (2048 if is_f64 else 8192) // BLOCK_C))
    _match_bwd_gather_kernel[(triton.cdiv(N, BLOCK_P), B)](
        grad_values, xa, xb, scale_a, scale_b, indices,
        grad_xa, grad_sa, grad_xb_acc, grad_sb, coef, coef_s,
        N, C,
        ATOMIC=atomic, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, SINGLE_C=C <= BLOCK_C, IS_F64=is_f64,
        num_warps=4,
    )
    if atomic:
        grad_xb = grad_xb_acc if grad_xb_acc.dtype == xb.dtype else grad_xb_acc.to(xb.dtype)
        return grad_xa, grad_xb, grad_sa, grad_sb
    order, segments = inverse_index(indices)
    grad_xb = torch.empty_like(xb)
    grad_sb = torch.empty_like(scale_b)
    _match_bwd_scatter_sorted_kernel[(B * N,)](
        xa, order, segments, coef, coef_s, grad_xb, grad_sb,
        C,
        BLOCK_C=BLOCK_C, IS_F64=is_f64,
        num_warps=1 if BLOCK_C <= 64 else 2,
    )
    return grad_xa, grad_xb, grad_sa, grad_sb
