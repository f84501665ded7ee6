"""The spatial seam: what one matching computes, described once and passed to every backend.

A feature map is ``(B, C, *spatial)`` with ``spatial = (H, W)`` (2D slices) or ``(D, H, W)``
(3D sub-volumes). Voxels are flattened row-major, ``p = (d * H + h) * W + w``, ``N = D * H * W``
(``p = h * W + w`` in 2D): every index the library returns is such a flat index, every per-voxel
tensor (masks, values, indices) is ``(B, *spatial)``. Windows have one size per spatial axis.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple

import torch

#: The window modes, and their integer codes in the ops' schema.
WINDOW_MODES = ("sliding", "partition")
WINDOW_MODE_CODES = {"sliding": 0, "partition": 1}

#: Number of spatial axes the library handles: 2 (slices) and 3 (volumes).
SPATIAL_RANKS = (2, 3)


class Matching(NamedTuple):
    """One matching problem a -> b, independent of the backend that solves it.

    Attributes:
        spatial: ``(H, W)`` or ``(D, H, W)``, the maps' spatial sizes.
        window: None for dense matching, else one window size per spatial axis.
        mode: ``"sliding"`` (centred neighbourhood) or ``"partition"`` (tiles from the origin);
            meaningless when dense.
        normalize: cosine similarities (each voxel's C-vector L2-normalised) or raw dot products.
        mask_a, mask_b: None or bool ``(B, *spatial)``: False removes a voxel as query and candidate.
    """

    spatial: Tuple[int, ...]
    window: Optional[Tuple[int, ...]]
    mode: str
    normalize: bool
    mask_a: Optional[torch.Tensor] = None
    mask_b: Optional[torch.Tensor] = None

    @property
    def dense(self) -> bool:
        return self.window is None

    @property
    def ndim(self) -> int:
        """Number of spatial axes, 2 or 3."""
        return len(self.spatial)

    @property
    def num_voxels(self) -> int:
        """``N``, the length of the flat voxel axis."""
        return math.prod(self.spatial)

    def swapped(self) -> "Matching":
        """The direction b -> a: queries in b, candidates in a, masks swapped."""
        return self._replace(mask_a=self.mask_b, mask_b=self.mask_a)

    def op_window(self) -> List[int]:
        """The window as the ops take it: ``[]`` for dense matching, else one size per axis."""
        return [] if self.window is None else list(self.window)

    def op_mode(self) -> int:
        return WINDOW_MODE_CODES[self.mode]

    def describe(self) -> str:
        """A short label, e.g. ``"dense 2D"`` or ``"sliding (1, 7, 7) 3D"``."""
        kind = "dense" if self.window is None else f"{self.mode} {self.window}"
        return f"{kind} {self.ndim}D"


def expand_window(window, ndim: int) -> Optional[Tuple[int, ...]]:
    """``window`` (None, an int or a tuple of ``ndim`` ints, already checked) as one size per axis."""
    if window is None:
        return None
    if isinstance(window, int):
        return (int(window),) * ndim
    return tuple(int(k) for k in window)


def matching_of(feat_a: torch.Tensor, window=None, mode: str = "sliding", mask_a=None, mask_b=None,
                normalize: bool = True) -> Matching:
    """The :class:`Matching` of a call on ``feat_a``'s shape (arguments already checked)."""
    spatial = tuple(int(s) for s in feat_a.shape[2:])
    return Matching(spatial, expand_window(window, len(spatial)), mode, bool(normalize), mask_a, mask_b)
