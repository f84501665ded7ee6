"""Masks on the feature grid.

A pair dataset gives foreground masks at image resolution, ``(B, 1, *spatial)`` in MONAI's
channel-first convention; a strided encoder's features are smaller. The losses take masks on the
feature grid, ``(B, *feature_spatial)``: :func:`feature_mask` brings one to the other.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F

Grid = Union[torch.Tensor, Sequence[int]]


def feature_mask(mask: torch.Tensor, grid: Grid) -> torch.Tensor:
    """A foreground mask on the feature grid: a cell is foreground when any pixel (voxel) in it is.

    Cells are those of :func:`torch.nn.functional.adaptive_max_pool2d` / ``3d``: for an image side
    ``S`` pooled to ``s`` cells, cell ``i`` covers pixels ``floor(i S / s)`` to ``ceil((i + 1) S / s) - 1``
    (exactly ``S / s`` pixels each when ``s`` divides ``S``, as for a strided encoder).

    Args:
        mask: bool ``(B, *spatial)`` or channel-first ``(B, 1, *spatial)``, with 2 or 3 spatial axes.
        grid: the features ``(B, C, *feature_spatial)`` the mask is for, or ``feature_spatial`` itself
            (a sequence of as many ints as the mask has spatial axes).

    Returns:
        bool ``(B, *feature_spatial)``, on the mask's device; the shape every loss takes.

    Raises:
        TypeError: ``mask`` is not a bool tensor, or ``grid`` is neither a tensor nor a sequence of ints.
        ValueError: a mask rank other than 3 or 4 (2D) / 4 or 5 (3D) with channel 1, or a grid whose
            rank does not match the mask's spatial axes, or a grid size < 1.

    Example:
        >>> feat_a = encoder(batch["image_a"])                      # (B, C, h, w)
        >>> mask_a = feature_mask(batch["mask_a"], feat_a)          # (B, 1, H, W) -> (B, h, w)
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = f"a {mask.dtype} tensor" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor; got {got}")
    if isinstance(grid, torch.Tensor):
        if grid.dim() not in (4, 5):
            raise ValueError(f"grid features must be (B, C, H, W) or (B, C, D, H, W); got shape {tuple(grid.shape)}")
        size = tuple(grid.shape[2:])
    elif isinstance(grid, Sequence) and all(isinstance(s, int) and not isinstance(s, bool) for s in grid):
        size = tuple(grid)
    else:
        raise TypeError(f"grid must be the features tensor or a sequence of ints; got {grid!r}")
    if len(size) not in (2, 3) or min(size) < 1:
        raise ValueError(f"grid must have 2 or 3 sizes >= 1; got {size}")
    dims = len(size)
    if mask.dim() == dims + 2:  # channel-first
        if mask.shape[1] != 1:
            raise ValueError(f"a channel-first mask must have one channel; got shape {tuple(mask.shape)}")
        mask = mask[:, 0]
    if mask.dim() != dims + 1:
        raise ValueError(
            f"mask must be (B, *spatial) or (B, 1, *spatial) with {dims} spatial axes for a grid of {size}; "
            f"got shape {tuple(mask.shape)}"
        )
    if tuple(mask.shape[1:]) == size:
        return mask
    pool = F.adaptive_max_pool2d if dims == 2 else F.adaptive_max_pool3d
    return pool(mask.unsqueeze(1).to(torch.float32), size).squeeze(1) > 0
