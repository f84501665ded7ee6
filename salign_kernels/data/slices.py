"""Volumes -> stacks of square slices, and the slice-pair sampling rule of the specification."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F


def check_axis(axis, ndim: int = 3) -> int:
    """``axis`` as an int in ``[0, ndim)``; negative values count from the end."""
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an int; got {axis!r} ({type(axis).__name__})")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis must be in [{-ndim}, {ndim - 1}] for a {ndim}D volume; got {axis}")
    return int(axis) % ndim


def _square_padding(shape: Sequence[int], spacing: Sequence[float]) -> Tuple[int, int, int, int]:
    """Padding ``(left, right, top, bottom)`` that makes an ``(H, W)`` slice square in millimetres.

    Resizing the padded slice to ``size x size`` then keeps the anatomy's aspect ratio, also for
    anisotropic in-plane voxels.
    """
    (h, w), (sh, sw) = shape, spacing
    extent = max(h * sh, w * sw)
    pad_h, pad_w = max(round(extent / sh) - h, 0), max(round(extent / sw) - w, 0)
    return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2


def to_slices(
    array: np.ndarray,
    axis: int,
    size: int,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    labels: bool = False,
) -> np.ndarray:
    """Cut a volume into its slices along ``axis`` and resample each to ``size x size``.

    Each slice is first padded with zeros (the background after normalisation) to a square field of
    view in mm, then resized: bilinear with antialiasing for images, nearest for label maps.

    Shape:
        ``array``: ``(X, Y, Z)`` -> ``(D, size, size)`` with ``D = array.shape[axis]``;
        float32 for images, int64 for ``labels=True``.
    """
    axis = check_axis(axis)
    stack = np.moveaxis(array, axis, 0)  # (D, H, W)
    in_plane = [s for a, s in enumerate(spacing) if a != axis]
    padding = _square_padding(stack.shape[1:], in_plane)
    x = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32)).unsqueeze(1)  # (D, 1, H, W)
    x = F.pad(x, padding)
    if labels:
        x = F.interpolate(x, size=(size, size), mode="nearest-exact")
        return x.squeeze(1).round().to(torch.int64).numpy()
    antialias = x.shape[-1] > size or x.shape[-2] > size
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
    return x.squeeze(1).numpy()


def sample_pair(
    num_slices: int,
    max_offset: int,
    rng: np.random.Generator,
    slice_range: Optional[Tuple[int, int]] = None,
) -> Tuple[int, int]:
    """Draw a slice pair ``(i, j)`` by the rule of the specification.

    ``i`` is uniform over the allowed slices; ``j = i + d`` with ``d`` uniform over the non-zero
    offsets in ``[-max_offset, max_offset]`` that keep ``j`` inside the volume (inside
    ``slice_range`` when one is given). ``d`` is drawn given ``i``, so both directions occur and no
    pair falls outside; at least one offset is always left because at least two slices are.

    Args:
        num_slices: D, the slices along the axis (>= 2).
        max_offset: the largest ``|j - i|`` (>= 1).
        rng: the source of randomness.
        slice_range: ``(first, last)`` allowed slice indices, inclusive; the whole volume when None.

    Returns:
        ``(i, j)``, ints in ``[first, last]``, ``i != j``, ``|i - j| <= max_offset``.
    """
    first, last = (0, num_slices - 1) if slice_range is None else slice_range
    i = int(rng.integers(first, last + 1))
    low, high = max(-max_offset, first - i), min(max_offset, last - i)
    offsets = [d for d in range(low, high + 1) if d != 0]
    return i, i + int(offsets[rng.integers(len(offsets))])
