"""Backward of every matching (dense and windowed): gather and scatter through the saved indices.

Kernels -> launcher. The forward pass saved, per query p, the index q = indices[p] of its best
candidate; the gradient touches only those pairs, O(B N C) work and memory instead of the
O(B N^2 C) of differentiating the similarity matrix. The normalisation's own gradient is applied
here too (see ``salign_kernels.ops._library``), so the features' gradients leave these kernels final,
in the features' dtype and strides.

With ``x_hat = r x``, ``r = 1 / max(||x||, eps)`` and ``proj`` 1 where the norm is not clamped (0
where it is; without normalisation ``r = 1``, ``proj = 0``), ``v_p = <xa_hat_p, xb_hat_q>`` and
``g_p`` the upstream gradient of a valid query (q = indices[p] >= 0):

    grad_xa[p] = g_p r_a[p] (xb_hat_q - proj_a[p] v_p xa_hat_p)
    grad_xb[q] = r_b[q] (G_q - proj_b[q] S_q xb_hat_q),   G_q = sum_{p -> q} g_p xa_hat_p,
                                                          S_q = sum_{p -> q} g_p v_p,

the form of the C++ kernels: every factor is of order 1 or is ``r`` itself, so neither huge nor
tiny norms under- or overflow (no ``r^3``). A voxel that is no valid query gets exactly zero in
``grad_xa``, one no query chose exactly zero in ``grad_xb``: a NaN or Inf at a masked voxel reaches
no gradient.

- The gather kernel (one program per ``BLOCK_P`` queries) writes ``grad_xa`` and, on the fast
  path, scatter-adds each query's ``g_p xa_hat_p`` to a float32 (float64) voxel-major accumulator
  of ``G`` and ``g_p v_p`` to ``S``, with relaxed atomics: the order of the additions, so the
  last bits of the result, may vary between runs.
- When ``torch.are_deterministic_algorithms_enabled()``, the gather kernel stores each query's
  ``g_p``, ``g_p v_p`` and flat target instead; a stable sort groups the queries by target, and
  each target's segment (found by binary search in the sorted targets) is summed in a fixed order
  (16 targets side by side per program).
- The finish kernel turns ``G`` and ``S`` into ``grad_xb`` (normalisation term, dtype, strides).

The fused loss (:func:`loss_backward`) reads the rows and factors its forward prepared instead of
preparing the maps again, computes ``g_p`` in the gather from the saved values
(:func:`._loss.loss_gradient`), and for two directions adds each map's candidate gradient in the
finish kernel to its gradient as a query.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._loss import loss_gradient
from ._runtime import is_interpreted, next_power_of_2
from .prepare import backward_factors


@triton.jit
def _match_bwd_gather_kernel(
    g_ptr, val_ptr, cnt_ptr, xa_ptr, xb_ptr, ha_ptr, ra_ptr, pa_ptr, hb_ptr, idx_ptr,
    gxa_ptr, accb_ptr, sumb_ptr, coef_ptr, coef_s_ptr, keys_ptr,
    N, C,
    sab, sap, sac, sbb, sbp, sbc, gab, gap, gac,  # strides (batch, voxel, channel) of xa, xb, grad_xa
    ATOMIC: tl.constexpr, LOSS: tl.constexpr, HALF: tl.constexpr, MEAN: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE_C: tl.constexpr, IS_F64: tl.constexpr,
):
    # grad_xa[p] = g_p r_a[p] (xb_hat_q - proj_a[p] v_p xa_hat_p)                      (here)
    # G_q += g_p xa_hat_p,  S_q += g_p v_p                                             (scatter)
    # x_hat = h * x: h_a, h_b the factors of the rows read (r itself for the maps, the forward's
    # scale for its rows u x). LOSS: g_p is the fused loss's (_loss.loss_gradient) from the upstream
    # gradient of the loss (g_ptr, one value), the direction's count (cnt_ptr) and the forward's
    # values (val_ptr); else g_ptr holds g. Deterministic path: the flat target of
    # each query goes to keys (B * N when none), for the sort.
    # Layout: x* and grad_xa through their strides, acc_b (B, N, C) contiguous, the rest (B, N).
    # Grid: (cdiv(N, BLOCK_P), B).
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    base = batch * N
    rows = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    row_ok = rows < N
    q = tl.load(idx_ptr + base + rows, mask=row_ok, other=-1)
    valid = row_ok & (q >= 0) & (q < N)  # out-of-range indices are treated as "no match"
    if not ATOMIC:
        key = tl.where(valid, base + q, N * tl.num_programs(1).to(tl.int64))
        tl.store(keys_ptr + base + rows, key.to(keys_ptr.dtype.element_ty), mask=row_ok)
    q = tl.where(valid, q, 0)
    if LOSS:
        saved = tl.load(val_ptr + base + rows, mask=valid, other=0.0)
        g = loss_gradient(tl.load(g_ptr), tl.load(cnt_ptr), saved, valid, HALF, MEAN)
    else:
        g = tl.load(g_ptr + base + rows, mask=valid, other=0.0)
    ha = tl.load(ha_ptr + base + rows, mask=valid, other=0.0)
    ra = tl.load(ra_ptr + base + rows, mask=valid, other=0.0)
    pa = tl.load(pa_ptr + base + rows, mask=valid, other=0.0)
    hb = tl.load(hb_ptr + base + q, mask=valid, other=0.0)
    a_rows = xa_ptr + batch * sab + rows.to(tl.int64)[:, None] * sap
    b_rows = xb_ptr + batch * sbb + q[:, None] * sbp
    ga_rows = gxa_ptr + batch * gab + rows.to(tl.int64)[:, None] * gap
    acc_rows = accb_ptr + (base + q)[:, None] * C
    cs = tl.arange(0, BLOCK_C)

    if IS_F64:
        v = tl.zeros([BLOCK_P], tl.float64)
    else:
        v = tl.zeros([BLOCK_P], tl.float32)
    # xa's own rows load under the row bound alone (a mask constant along each row: 16-byte vector
    # loads) and ra = 0 zeroes the invalid ones; xb's rows are gathered under the validity.
    if SINGLE_C:
        in_row = (cs < C)[None, :]
        a_res = tl.load(a_rows + cs.to(tl.int64)[None, :] * sac, mask=row_ok[:, None] & in_row, other=0.0)
        a_res = tl.where(valid[:, None], a_res.to(v.dtype) * ha[:, None], 0.0)
        b_res = tl.load(b_rows + cs.to(tl.int64)[None, :] * sbc, mask=valid[:, None] & in_row, other=0.0)
        b_res = b_res.to(v.dtype) * hb[:, None]
        v = tl.sum(a_res * b_res, axis=1)
    else:
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cs
            in_row = (cc < C)[None, :]
            a = tl.load(a_rows + cc.to(tl.int64)[None, :] * sac, mask=row_ok[:, None] & in_row, other=0.0)
            a = tl.where(valid[:, None], a.to(v.dtype) * ha[:, None], 0.0)
            b = tl.load(b_rows + cc.to(tl.int64)[None, :] * sbc, mask=valid[:, None] & in_row, other=0.0)
            v += tl.sum(a * (b.to(v.dtype) * hb[:, None]), axis=1)

    coef = g * ra
    shift = pa * v
    coef_s = g * v
    # Relaxed atomics: the sums are only read by the next kernel, so no ordering is needed here (the
    # default acq_rel fences every atomic and invalidates L1).
    if ATOMIC:
        tl.atomic_add(sumb_ptr + base + q, coef_s, mask=valid, sem="relaxed")
    else:
        tl.store(coef_ptr + base + rows, g, mask=row_ok)
        tl.store(coef_s_ptr + base + rows, tl.where(valid, coef_s, 0.0), mask=row_ok)

    if SINGLE_C:
        store_mask = row_ok[:, None] & (cs < C)[None, :]
        grad = tl.where(valid[:, None], coef[:, None] * (b_res - shift[:, None] * a_res), 0.0)
        tl.store(ga_rows + cs.to(tl.int64)[None, :] * gac, grad.to(gxa_ptr.dtype.element_ty), mask=store_mask)
        if ATOMIC:
            both = valid[:, None] & (cs < C)[None, :]
            tl.atomic_add(acc_rows + cs[None, :], g[:, None] * a_res, mask=both, sem="relaxed")
    else:
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cs
            in_row = (cc < C)[None, :]
            both = valid[:, None] & in_row
            a = tl.load(a_rows + cc.to(tl.int64)[None, :] * sac, mask=row_ok[:, None] & in_row, other=0.0)
            a = tl.where(valid[:, None], a.to(v.dtype) * ha[:, None], 0.0)
            b = tl.load(b_rows + cc.to(tl.int64)[None, :] * sbc, mask=both, other=0.0).to(v.dtype) * hb[:, None]
            store_mask = row_ok[:, None] & in_row
            grad = tl.where(valid[:, None], coef[:, None] * (b - shift[:, None] * a), 0.0)
            tl.store(ga_rows + cc.to(tl.int64)[None, :] * gac, grad.to(gxa_ptr.dtype.element_ty), mask=store_mask)
            if ATOMIC:
                tl.atomic_add(acc_rows + cc[None, :], g[:, None] * a, mask=both, sem="relaxed")


@triton.jit
def _lower_bound(keys_ptr, T, targets, STEPS):
    """The first position ``i < T`` with ``keys[i] >= target`` (``T`` if none), per target, of
    ascending ``keys``: ``STEPS`` (the bit length of ``T``) halvings of ``[0, T)``."""
    lo = tl.zeros_like(targets)
    hi = tl.zeros_like(targets) + T
    for _ in range(0, STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        key = tl.load(keys_ptr + mid, mask=active, other=0).to(tl.int64)
        right = active & (key < targets)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & (key >= targets), mid, hi)
    return lo


@triton.jit
def _match_bwd_scatter_sorted_kernel(
    xa_ptr, ha_ptr, order_ptr, keys_ptr, coef_ptr, coef_s_ptr, accb_ptr, sumb_ptr,
    T, N, C, sab, sap, sac, SEARCH_STEPS,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, IS_F64: tl.constexpr,
):
    # The deterministic scatter of the gather kernel's sums:
    #   acc_b[t] = sum_{i in seg[t] .. seg[t+1]-1} g[order[i]] xa_hat[order[i]]
    #   sum_b[t] = sum_{same i} coef_s[order[i]]
    # over flat voxel indices t = b * N + q < T = B * N; order lists the flat queries sorted
    # (stably) by target, so each sum runs in increasing p, and t's segment of it, where the sorted
    # keys equal t, is found by binary search (SEARCH_STEPS = bit length of T halvings of the T
    # keys, every query's: the invalid ones sort last). One program sums BLOCK_T consecutive
    # targets side by side: step j adds the j-th query of every segment that has one (an exact +0
    # to those that have not), so each target sees the same additions in the same order as it would
    # alone. A program's targets lie in one batch, that of every query choosing them, so a query's
    # pixel is flat - batch * N (no 64-bit division, a subroutine call in the loop).
    # Grid: (cdiv(N, BLOCK_T), B).
    batch = tl.program_id(1).to(tl.int64)
    base = batch * N
    t = base + tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < base + N
    start = _lower_bound(keys_ptr, T, t, SEARCH_STEPS)
    length = tl.where(t_ok, _lower_bound(keys_ptr, T, t + 1, SEARCH_STEPS) - start, 0)
    longest = tl.max(length, axis=0)
    cs = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cs
        if IS_F64:
            acc = tl.zeros([BLOCK_T, BLOCK_C], tl.float64)
            acc_s = tl.zeros([BLOCK_T], tl.float64)
        else:
            acc = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
            acc_s = tl.zeros([BLOCK_T], tl.float32)
        for j in range(0, longest):
            live = j < length
            flat = tl.load(order_ptr + start + j, mask=live, other=0)
            x_rows = xa_ptr + batch * sab + (flat - base) * sap
            x = tl.load(x_rows[:, None] + cc.to(tl.int64)[None, :] * sac, mask=live[:, None] & (cc < C)[None, :],
                        other=0.0)
            x = x.to(acc.dtype) * tl.load(ha_ptr + flat, mask=live, other=0.0)[:, None]
            acc += tl.load(coef_ptr + flat, mask=live, other=0.0)[:, None] * x
            acc_s += tl.load(coef_s_ptr + flat, mask=live, other=0.0)
        tl.store(accb_ptr + t[:, None] * C + cc[None, :], acc, mask=t_ok[:, None] & (cc < C)[None, :])
        tl.store(sumb_ptr + t, acc_s, mask=t_ok)  # the same sums in every chunk


@triton.jit
def _match_bwd_finish_kernel(
    accb_ptr, sumb_ptr, xb_ptr, hb_ptr, rb_ptr, pb_ptr, gxb_ptr,
    N, C, sbb, sbp, sbc, gbb, gbp, gbc,
    ACCUMULATE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, IS_F64: tl.constexpr,
):
    # grad_xb[q] = r_b[q] (G_q - proj_b[q] S_q xb_hat_q), each term exactly 0 where its sum is (no
    # query chose q: its features, NaN or not, reach nothing), in xb's dtype and grad_xb's strides;
    # xb_hat = h_b * xb. ACCUMULATE adds it to what grad_xb holds (b's own gradient as a query,
    # in a symmetric loss). Grid: (cdiv(N, BLOCK_P), B).
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    base = batch * N
    rows = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    row_ok = rows < N
    s = tl.load(sumb_ptr + base + rows, mask=row_ok, other=0.0)
    rb = tl.load(rb_ptr + base + rows, mask=row_ok, other=0.0)
    hb = tl.load(hb_ptr + base + rows, mask=row_ok, other=0.0)
    shift = s * tl.load(pb_ptr + base + rows, mask=row_ok, other=0.0)
    cs = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cs
        both = row_ok[:, None] & (cc < C)[None, :]
        acc = tl.load(accb_ptr + (base + rows.to(tl.int64))[:, None] * C + cc[None, :], mask=both, other=0.0)
        x = tl.load(xb_ptr + batch * sbb + rows.to(tl.int64)[:, None] * sbp + cc.to(tl.int64)[None, :] * sbc,
                    mask=both, other=0.0).to(acc.dtype) * hb[:, None]
        term_g = tl.where(acc != 0, rb[:, None] * acc, 0.0)
        term_s = tl.where((shift != 0)[:, None], rb[:, None] * (shift[:, None] * x), 0.0)
        grad = term_g - term_s
        out = gxb_ptr + batch * gbb + rows.to(tl.int64)[:, None] * gbp + cc.to(tl.int64)[None, :] * gbc
        if ACCUMULATE:
            grad = tl.load(out, mask=both, other=0.0).to(acc.dtype) + grad
        tl.store(out, grad.to(gxb_ptr.dtype.element_ty), mask=both)


INTERPRETED = is_interpreted(_match_bwd_gather_kernel)


def block_c(C: int) -> int:
    """Channel chunk: all of C up to 128, else 64-wide chunks."""
    padded = next_power_of_2(C)
    return padded if padded <= 128 else 64


#: Targets one program of the deterministic scatter sums side by side.
SCATTER_TARGETS = 16


def gather_rows(block_c: int, is_f64: bool, single_chunk: bool = True) -> int:
    """Queries per program of the gather and finish kernels: a register budget. Each program holds
    its ``(BLOCK_P, BLOCK_C)`` tiles of xa and xb in the accumulation dtype across 128 threads;
    4096 fp32 values per tile (32 queries at C = 128) keep sm_90's gather within 255 registers with
    no spills (64 queries spilled), float64 a quarter of that (32 x 64 float64 spilled). Channels in
    several chunks (C > 128): 16 queries, since the chunk loops keep every row's pointers into
    xa, xb, grad_xa and acc_b live (32 x 64 reached 255 registers and spilled in the atomic path)."""
    if INTERPRETED or not single_chunk:
        return 16
    return max(16, min(32, (1024 if is_f64 else 4096) // block_c))


class Prepared(NamedTuple):
    """A map as the backward reads it, voxel-major (B, N, C) through strides: ``own`` its rows read
    in order, ``rows`` those read at scattered voxels (the same, or a contiguous copy), ``hat``
    with ``hat * rows = x_hat``, and the chain rule's ``r`` and ``proj`` (B, N)."""

    own: torch.Tensor
    rows: torch.Tensor
    hat: torch.Tensor
    r: torch.Tensor
    proj: torch.Tensor


class LossGradient(NamedTuple):
    """The fused loss's gradient source of one direction (:func:`._loss.loss_gradient`): the
    upstream gradient (0-dim), the direction's count of valid queries (0-dim int64), the forward's
    values (B, N), and whether the loss halves (two directions) and divides by the count."""

    grad_loss: torch.Tensor
    count: torch.Tensor
    values: torch.Tensor
    half: bool
    mean: bool


def search_steps(T: int) -> int:
    """Halvings that narrow any position in ``[0, T]`` down to one."""
    return max(1, int(T).bit_length())


def _key_dtype(T: int) -> torch.dtype:
    """The sort's keys: int32 while the flat targets and their sentinel fit (fewer radix passes)."""
    return torch.int32 if T < 2**31 - 1 else torch.int64


def direction_backward(gradient, queries: Prepared, candidates: Prepared, indices, grad_queries, acc, sums,
                       atomic: bool) -> None:
    """One direction's gather (and deterministic scatter): ``grad_queries`` (the queries' whole
    gradient as queries) and the candidates' sums ``acc`` (B, N, C) and ``sums`` (B, N), zeroed
    beforehand on the atomic path. ``gradient``: ``grad_values`` (B, N) or a :class:`LossGradient`."""
    B, N, C = queries.own.shape
    is_f64 = queries.own.dtype == torch.float64
    loss = isinstance(gradient, LossGradient)
    if atomic:
        coef = coef_s = keys = sums  # not written on this path
    else:
        coef = torch.empty((B, N), dtype=acc.dtype, device=acc.device)
        coef_s = torch.empty((B, N), dtype=acc.dtype, device=acc.device)
        keys = torch.empty((B * N,), dtype=_key_dtype(B * N), device=acc.device)
    if loss:
        g, values, count = gradient.grad_loss, gradient.values, gradient.count
    else:
        g = values = count = gradient
    BLOCK_C = block_c(C)
    BLOCK_P = gather_rows(BLOCK_C, is_f64, C <= BLOCK_C)
    _match_bwd_gather_kernel[(triton.cdiv(N, BLOCK_P), B)](
        g, values, count, queries.own, candidates.rows, queries.hat, queries.r, queries.proj, candidates.hat,
        indices, grad_queries, acc, sums, coef, coef_s, keys,
        N, C, *queries.own.stride(), *candidates.rows.stride(), *grad_queries.stride(),
        ATOMIC=atomic, LOSS=loss, HALF=loss and gradient.half, MEAN=loss and gradient.mean,
        BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, SINGLE_C=C <= BLOCK_C, IS_F64=is_f64,
        num_warps=4,
    )
    if not atomic:
        # A stable sort groups the queries by target in increasing p; each target's segment is
        # found by binary search in the scatter. No host synchronisation.
        sorted_keys, order = torch.sort(keys, stable=True)
        T = B * N
        _match_bwd_scatter_sorted_kernel[(triton.cdiv(N, SCATTER_TARGETS), B)](
            queries.rows, queries.hat, order, sorted_keys, coef, coef_s, acc, sums,
            T, N, C, *queries.rows.stride(), search_steps(T),
            BLOCK_T=SCATTER_TARGETS, BLOCK_C=BLOCK_C, IS_F64=is_f64,
            num_warps=4,
        )


def finish(acc, sums, candidates: Prepared, grad_candidates, accumulate: bool) -> None:
    """The candidates' gradient from their sums, written (or, ``accumulate``, added) to ``grad_candidates``."""
    B, N, C = candidates.own.shape
    is_f64 = candidates.own.dtype == torch.float64
    BLOCK_C = block_c(C)
    BLOCK_P = gather_rows(BLOCK_C, is_f64)
    _match_bwd_finish_kernel[(triton.cdiv(N, BLOCK_P), B)](
        acc, sums, candidates.own, candidates.hat, candidates.r, candidates.proj, grad_candidates,
        N, C, *candidates.own.stride(), *grad_candidates.stride(),
        ACCUMULATE=accumulate, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, IS_F64=is_f64,
        num_warps=4,
    )


def accumulators(B: int, N: int, C: int, maps: int, dtype: torch.dtype, device, atomic: bool):
    """``maps`` pairs ``(acc (B, N, C), sums (B, N))``: zeroed by one fill on the atomic path, left
    uninitialised for the deterministic scatter, which writes every entry. Each piece starts at a
    multiple of 16 elements, so that every one is 16-byte aligned whatever B * N: the JIT then
    vectorises the atomics into it (a misaligned second pair, at odd N, compiled to scalar
    atomics and spilled)."""
    acc_size, sums_size = (-(-n // 16) * 16 for n in (B * N * C, B * N))
    size = acc_size + sums_size
    make = torch.zeros if atomic else torch.empty
    flat = make(maps * size, dtype=dtype, device=device)
    return [(flat[m * size: m * size + B * N * C].view(B, N, C),
             flat[m * size + acc_size: m * size + acc_size + B * N].view(B, N)) for m in range(maps)]


def match_backward(grad_values, xa, xb, indices, normalize: bool, grad_xa, grad_xb) -> None:
    """Launch the backward kernels, writing ``grad_xa`` and ``grad_xb``, normalisation included.

    Shapes: ``grad_values``, ``indices`` (B, N) contiguous; ``xa``, ``xb`` and the gradients
    voxel-major (B, N, C) through their strides, the gradients in the features' dtype.
    """
    B, N, C = xa.shape
    atomic = not torch.are_deterministic_algorithms_enabled()
    # The factors of the normalisation's gradient, and the rows read at scattered voxels: xb's by
    # the gather, xa's by the deterministic scatter (the gather reads xa's own rows in order).
    xa_rows, r_a, proj_a = backward_factors(xa, normalize, rows=not atomic)
    xb_rows, r_b, proj_b = backward_factors(xb, normalize, rows=True)
    queries = Prepared(xa, xa_rows, r_a, r_a, proj_a)
    candidates = Prepared(xb, xb_rows, r_b, r_b, proj_b)
    ((acc_b, sum_b),) = accumulators(B, N, C, 1, grad_values.dtype, xb.device, atomic)
    direction_backward(grad_values, queries, candidates, indices, grad_xa, acc_b, sum_b, atomic)
    finish(acc_b, sum_b, candidates, grad_xb, accumulate=False)


def loss_backward(gradients, prepared_a: Prepared, prepared_b: Prepared, indices, grad_a, grad_b) -> None:
    """The fused loss's backward: ``gradients`` and ``indices`` one per direction (a -> b, then
    b -> a), each map :class:`Prepared` by the forward; writes ``grad_a`` and ``grad_b``."""
    B, N, C = prepared_a.own.shape
    atomic = not torch.are_deterministic_algorithms_enabled()
    directions = [(prepared_a, prepared_b, grad_a, grad_b), (prepared_b, prepared_a, grad_b, grad_a)]
    sums = accumulators(B, N, C, len(gradients), gradients[0].values.dtype, grad_a.device, atomic)
    for gradient, idx, (queries, candidates, grad_q, _), (acc, s) in zip(gradients, indices, directions, sums):
        direction_backward(gradient, queries, candidates, idx, grad_q, acc, s, atomic)
    for (_, candidates, _, grad_c), (acc, s) in zip(directions, sums):
        # The candidates of a -> b are b, whose own gradient as queries b -> a wrote (symmetric).
        finish(acc, s, candidates, grad_c, accumulate=len(gradients) == 2)
