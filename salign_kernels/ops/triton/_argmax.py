"""The running (max, argmax) of the forward kernels: NaN wins as in ``torch.max``, ties keep the
lowest index. Shared ``@triton.jit`` helpers, inlined into each kernel.

A block of similarities is reduced through integer keys: a NaN candidate keeps its index
``q < 2**30``, a candidate at the block's maximum becomes ``q + SHIFT``, anything else ``NO_HIT``;
one min-reduction then gives the first NaN if there is one, else the first maximiser. ``tl.max``
skips NaN (compiled and interpreted alike), which is why NaN is found through the index. Pixel
indices must stay below ``2**30`` (the ops check ``H * W``).
"""

from __future__ import annotations

import triton
import triton.language as tl

# constexpr: compiled kernels may read no other kind of global.
SHIFT = tl.constexpr(2**30)
NO_HIT = tl.constexpr(2**31 - 1)


@triton.jit
def block_argmax(s, index, candidate, AXIS: tl.constexpr):
    """Reduce a block of similarities ``s`` along ``AXIS``.

    ``index`` (each entry's candidate index) and ``candidate`` (whether it is a real candidate)
    broadcast against ``s``. Returns ``(top, arg, is_nan, first)``: the maximum (NaN if any entry
    is NaN), the lowest index attaining it (the lowest NaN's), whether it is NaN, and the lowest
    real candidate (``NO_HIT`` if none), which a slice of only ``-inf`` takes as its ``arg``.
    """
    top = tl.max(s, AXIS)
    at_max = tl.where(s == tl.expand_dims(top, AXIS), index + SHIFT, NO_HIT)
    key = tl.min(tl.where(s != s, index, at_max), AXIS)
    is_nan = key < SHIFT
    arg = tl.where(is_nan, key, key - SHIFT)
    top = tl.where(is_nan, float("nan"), top)
    first = tl.min(tl.where(candidate, index, NO_HIT), AXIS)
    arg = tl.where(top == float("-inf"), first, arg)
    return top, arg, is_nan, first


@triton.jit
def fold_best(best, best_idx, top, arg, is_nan, first):
    """Merge a later block's ``block_argmax`` into the running ``(best, best_idx)``.

    Strictly greater wins, so earlier blocks (lower indices) keep ties; NaN beats any number and the
    first NaN stays; a query without a best yet takes any block that has a real candidate.
    """
    better = (top > best) | (is_nan & (best == best))
    better = better | ((best_idx < 0) & (first < NO_HIT))
    return tl.where(better, top, best), tl.where(better, arg, best_idx)
