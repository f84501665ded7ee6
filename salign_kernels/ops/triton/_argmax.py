"""The running (max, argmax) of the forward kernels: NaN wins as in ``torch.max``, ties keep the
lowest index. Shared ``@triton.jit`` helpers, inlined into each kernel.

Two forms:

- lean (``tile_argmax``, ``fold_strict``): what the scans' hot loops run. A NaN-keeping row max
  (in one of two forms of the same answer: one for compiled kernels, one the interpreter runs
  fast), one compare-select-min for the lowest index at it, a strictly-greater merge. It gives the
  right answer for every row whose maximum is a number above ``-inf``; the rows it cannot settle
  (it saw a NaN, or no candidate above ``-inf``) are flagged, and the kernel settles them with the
  exact form.
- exact (``block_argmax``, ``fold_best``): every rule in one pass. A block of similarities is
  reduced through integer keys: a NaN candidate keeps its index ``q < 2**30``, a candidate at the
  block's maximum becomes ``q + SHIFT``, anything else ``NO_HIT``; one min-reduction then gives the
  first NaN if there is one, else the first maximiser. ``tl.max`` skips NaN (compiled and
  interpreted alike), which is why NaN is found through the index. Pixel indices must stay below
  ``2**30`` (the ops check ``H * W``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._runtime import is_interpreted

# constexpr: compiled kernels may read no other kind of global.
SHIFT = tl.constexpr(2**30)
NO_HIT = tl.constexpr(2**31 - 1)


@triton.jit
def _max_keep_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _lowest_index_at(s, top, index):
    """Each row's lowest ``index`` where ``s`` equals its ``top`` (``NO_HIT`` where none does: a NaN
    top)."""
    return tl.min(tl.where(s == top[:, None], index, NO_HIT), 1)


@triton.jit
def tile_argmax_compiled(s, index):
    """``(top, arg)`` of each row of a ``(rows, candidates)`` block ``s``: the row max (NaN if the
    row holds one) and the lowest ``index`` (broadcast against ``s``) attaining it; ``NO_HIT``
    where the max is NaN (nothing equals it). One NaN-propagating max per element."""
    top = tl.reduce(s, 1, _max_keep_nan)
    return top, _lowest_index_at(s, top, index)


@triton.jit
def tile_argmax_interpreted(s, index):
    """:func:`tile_argmax_compiled`'s answer through the built-in reductions only. The interpreter
    runs a custom combine function once per element pair in Python (tens of thousands of calls a
    tile) but ``tl.max`` as one numpy call; compiled, this form costs a compare and a second
    reduction more per element."""
    has_nan = tl.max((s != s).to(tl.int32), 1) != 0
    top = tl.where(has_nan, float("nan"), tl.max(s, 1))
    return top, _lowest_index_at(s, top, index)


#: The form the scans call: the same answers (tests/test_triton.py compares the two under the
#: interpreter), each the cheaper where it runs.
tile_argmax = tile_argmax_interpreted if is_interpreted(_max_keep_nan) else tile_argmax_compiled


@triton.jit
def fold_strict(best, best_idx, saw_nan, top, arg):
    """Merge a later block's ``tile_argmax`` into the running best: strictly greater wins, so
    earlier blocks (lower indices) keep ties and a block whose max is ``-inf`` or NaN is never
    taken; ``saw_nan`` (int32) flags the rows that met a NaN, which the lean form cannot settle."""
    saw_nan = saw_nan | (top != top).to(tl.int32)
    better = top > best
    return tl.where(better, top, best), tl.where(better, arg, best_idx), saw_nan


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
