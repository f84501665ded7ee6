"""The alignment loss inside the kernels: per-program partial sums, one finishing program.

The fused loss op (:func:`salign_kernels.ops._library` ``alignment_loss``) needs, per direction,
``S = sum_p l_p`` with ``l_p = |1 - values[p]|`` over the valid queries (``indices[p] >= 0``) and
their count ``n``. Every program of a forward scan that writes final values adds its block's
share with :func:`store_partial` into its own slot (no atomics: a fixed order, so the loss is the
same bits on every run, deterministic mode or not); :func:`finish_loss` then sums the slots of
both directions in one program and writes

    loss = mean over directions of (S / max(n, 1))   ("mean")   or   of S   ("sum"),

in the accumulation dtype, and each direction's ``n`` for the backward. No host synchronisation.

The backward's per-query gradient of that loss, ``grad_values[p] = -((g / D / max(n, 1)) *
sgn(1 - values[p]))`` (``g`` the upstream gradient of the loss, ``D`` the directions, the divisions
only where they apply, ``sgn(NaN) = 0``), is what PyTorch's autograd gives the composed reduction
of :mod:`salign_kernels._reduction` term by term; :func:`loss_gradient` computes it in the gather
kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Slots the finishing program sums per step.
FINISH_BLOCK = 1024


@triton.jit
def store_partial(values, valid, sums_ptr, counts_ptr, slot, WRITE: tl.constexpr):
    """Store a block's ``sum(|1 - v|)`` over its ``valid`` queries and their number at ``slot``."""
    if WRITE:
        loss = tl.where(valid, tl.abs(1.0 - values), 0.0)
        tl.store(sums_ptr + slot, tl.sum(loss, axis=0))
        tl.store(counts_ptr + slot, tl.sum(valid.to(tl.int32), axis=0))


@triton.jit
def loss_gradient(grad_loss, count, values, valid, HALF: tl.constexpr, MEAN: tl.constexpr):
    """``d loss / d values[p]`` of one direction for a block of queries (0 where not ``valid``),
    in the order of operations of the composed reduction's autograd (see the module docstring)."""
    scale = grad_loss
    if HALF:
        scale = scale / 2.0
    if MEAN:
        scale = scale / tl.maximum(count, 1).to(values.dtype)
    d = 1.0 - values
    sign = (d > 0).to(values.dtype) - (d < 0).to(values.dtype)  # sgn, 0 at NaN as torch.sgn
    return tl.where(valid, -(scale * sign), 0.0)


@triton.jit
def _loss_finish_kernel(
    sums_ptr, counts_ptr, loss_ptr, totals_ptr, SLOTS,
    DIRECTIONS: tl.constexpr, MEAN: tl.constexpr, BLOCK: tl.constexpr, IS_F64: tl.constexpr,
):
    # sums / counts: (DIRECTIONS, SLOTS); loss: (1,); totals: (DIRECTIONS,) int64. Grid: (1,).
    offsets = tl.arange(0, BLOCK)
    loss = 0.0
    for d in tl.static_range(DIRECTIONS):
        if IS_F64:
            acc = tl.zeros([BLOCK], tl.float64)
        else:
            acc = tl.zeros([BLOCK], tl.float32)
        count = tl.zeros([BLOCK], tl.int64)
        for start in range(0, SLOTS, BLOCK):
            ok = start + offsets < SLOTS
            acc += tl.load(sums_ptr + d * SLOTS + start + offsets, mask=ok, other=0.0)
            count += tl.load(counts_ptr + d * SLOTS + start + offsets, mask=ok, other=0).to(tl.int64)
        total = tl.sum(acc, axis=0)
        n = tl.sum(count, axis=0)
        tl.store(totals_ptr + d, n)
        if MEAN:
            total = total / tl.maximum(n, 1).to(total.dtype)
        loss += total
    if DIRECTIONS == 2:
        loss = loss / 2.0
    tl.store(loss_ptr, loss)


def partial_buffers(directions: int, slots: int, dtype: torch.dtype, device: torch.device):
    """``(sums, counts)``: ``(directions, slots)`` slots for :func:`store_partial`."""
    sums = torch.empty((directions, slots), dtype=dtype, device=device)
    counts = torch.empty((directions, slots), dtype=torch.int32, device=device)
    return sums, counts


def finish_loss(sums: torch.Tensor, counts: torch.Tensor, mean: bool):
    """``(loss, totals)``: the 0-dim loss and each direction's count of valid queries (int64)."""
    directions, slots = sums.shape
    loss = torch.empty((), dtype=sums.dtype, device=sums.device)
    totals = torch.empty((directions,), dtype=torch.int64, device=sums.device)
    _loss_finish_kernel[(1,)](
        sums, counts, loss, totals, slots,
        DIRECTIONS=directions, MEAN=bool(mean), BLOCK=FINISH_BLOCK, IS_F64=sums.dtype == torch.float64,
        num_warps=4,
    )
    return loss, totals
