"""The sub-volume pair rule of the specification: two crops of one volume, and their positions.

A crop is given by its corner (the index of its first voxel on every axis) and its size; it covers
``corner[k] .. corner[k] + size[k] - 1`` on axis ``k``.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

Corner = Tuple[int, ...]


def offset_room(shape: Sequence[int], crop: Sequence[int], max_offset: Sequence[int]) -> Tuple[int, ...]:
    """Per axis, the largest ``|offset|`` any pair can have: ``min(max_offset, n - crop)``.

    A pair needs one axis where this is at least 1; :func:`sample_crop_pair` raises otherwise.
    """
    return tuple(min(m, n - s) for n, s, m in zip(shape, crop, max_offset))


def sample_crop_pair(
    shape: Sequence[int], crop: Sequence[int], max_offset: Sequence[int], rng: np.random.Generator
) -> Tuple[Corner, Corner]:
    """Draw the corners of a sub-volume pair.

    ``corner_a`` is uniform over the corners that keep the crop inside the volume (independently per
    axis); the offset ``d = corner_b - corner_a`` is uniform over the integer vectors with
    ``|d[k]| <= max_offset[k]`` that keep crop b inside too, the zero vector excluded (drawn per axis
    and redrawn when all zero: the zero vector has probability at most 1/2, so this ends fast). ``d``
    is drawn given ``corner_a``, so both directions occur near the borders and no crop falls outside.

    Args:
        shape: the volume's size per axis.
        crop: the crops' size per axis, each ``<= shape``.
        max_offset: the largest ``|d|`` per axis (>= 0).
        rng: the source of randomness.

    Returns:
        ``(corner_a, corner_b)``, tuples of ints with ``0 <= corner <= shape - crop``.

    Raises:
        ValueError: a crop larger than the volume, or no axis with room for an offset (the crop
            fills the volume on every axis that ``max_offset`` lets move).
    """
    if any(s > n for n, s in zip(shape, crop)):
        raise ValueError(f"crop {tuple(crop)} is larger than the volume {tuple(shape)}")
    if max(offset_room(shape, crop, max_offset)) < 1:
        raise ValueError(
            f"crop {tuple(crop)} with max_offset {tuple(max_offset)} leaves no room for an offset in a "
            f"volume of {tuple(shape)}"
        )
    corner_a = tuple(int(rng.integers(0, n - s + 1)) for n, s in zip(shape, crop))
    # The offsets per axis that keep crop b inside: always contains 0, and something else on the
    # axes with room, so a non-zero vector exists and the loop ends.
    bounds = [(max(-m, -a), min(m, n - s - a)) for n, s, m, a in zip(shape, crop, max_offset, corner_a)]
    while True:
        offset = tuple(int(rng.integers(low, high + 1)) for low, high in bounds)
        if any(offset):
            break
    return corner_a, tuple(a + d for a, d in zip(corner_a, offset))


def crop_position(corner: Sequence[int], crop: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """The crop's centre, normalised per axis: ``(corner + (crop - 1) / 2) / (n - 1)``.

    The centre is in voxel indices, so a crop of one voxel along an axis is at the slice position
    ``i / (n - 1)`` of the slice pairs, and the positions of two crops of one size differ by their
    offset over ``n - 1``. The values lie in [0, 1] (in ``[(crop - 1) / 2, n - 1 - (crop - 1) / 2]
    / (n - 1)``); an axis of one voxel is at 0.

    Shape: ``(3,)`` float32 for 3 axes.
    """
    centre = np.asarray(corner, dtype=np.float64) + (np.asarray(crop, dtype=np.float64) - 1) / 2
    return (centre / np.maximum(np.asarray(shape, dtype=np.float64) - 1, 1)).astype(np.float32)
