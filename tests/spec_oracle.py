"""The specification's matching rule written as plain loops over voxels, in float64.

Too slow for anything but tiny maps; it exists to check the reference's candidate sets (window
borders, ragged partition tiles, masks, ties) independently of its tensor tricks, in 2D and 3D.
"""

from __future__ import annotations

import itertools
import math

import torch


def _axis_candidates(x, size, k, mode):
    """Coordinates of the candidates of coordinate x on one axis, in increasing order."""
    if mode == "sliding":
        r = k // 2
        return range(max(0, x - r), min(size, x + r + 1))
    start = (x // k) * k
    return range(start, min(size, start + k))


def candidate_set(position, spatial, window, mode):
    """Flat indices of the candidates of the query at ``position`` (one coordinate per axis), in
    increasing order."""
    N = math.prod(spatial)
    if window is None:
        return list(range(N))
    window = (window,) * len(spatial) if isinstance(window, int) else tuple(window)
    axes = [_axis_candidates(x, size, k, mode) for x, size, k in zip(position, spatial, window)]
    flat = []
    for coords in itertools.product(*axes):  # row-major: increasing flat index
        index = 0
        for c, size in zip(coords, spatial):
            index = index * size + c
        flat.append(index)
    return flat


def spec_match(feat_a, feat_b, window=None, mode="sliding", mask_a=None, mask_b=None, normalize=True):
    """(values, indices) per the specification, float64, for (B, C, *spatial) features."""
    B = feat_a.shape[0]
    spatial = tuple(feat_a.shape[2:])
    N = math.prod(spatial)
    xa, xb = feat_a.double(), feat_b.double()
    if normalize:
        xa = xa / xa.norm(dim=1, keepdim=True).clamp_min(1e-12)
        xb = xb / xb.norm(dim=1, keepdim=True).clamp_min(1e-12)
    xa, xb = xa.flatten(2), xb.flatten(2)  # (B, C, N)
    values = torch.zeros(B, N, dtype=torch.float64)
    indices = torch.full((B, N), -1, dtype=torch.int64)
    for b in range(B):
        ma = None if mask_a is None else mask_a[b].flatten()
        mb = None if mask_b is None else mask_b[b].flatten()
        for p, position in enumerate(itertools.product(*(range(s) for s in spatial))):
            if ma is not None and not ma[p]:
                continue
            best, best_q = None, -1
            for q in candidate_set(position, spatial, window, mode):
                if mb is not None and not mb[q]:
                    continue
                s = float(xa[b, :, p] @ xb[b, :, q])
                if best is None or s > best:  # strict: ties keep the lowest q
                    best, best_q = s, q
            if best_q >= 0:
                values[b, p], indices[b, p] = best, best_q
    return values.view(B, *spatial), indices.view(B, *spatial)
