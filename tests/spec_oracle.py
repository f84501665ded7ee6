"""The specification's matching rule written as plain loops over pixels, in float64.

Too slow for anything but tiny maps; it exists to check the reference's candidate sets (window
borders, ragged partition tiles, masks, ties) independently of its tensor tricks.
"""

from __future__ import annotations

import torch


def candidate_set(h, w, H, W, window, mode):
    """Flat indices of the candidates of query (h, w), in increasing order."""
    if window is None:
        return list(range(H * W))
    if mode == "sliding":
        r = window // 2
        rows = range(max(0, h - r), min(H, h + r + 1))
        cols = range(max(0, w - r), min(W, w + r + 1))
    else:
        top, left = (h // window) * window, (w // window) * window
        rows = range(top, min(H, top + window))
        cols = range(left, min(W, left + window))
    return [i * W + j for i in rows for j in cols]


def spec_match(feat_a, feat_b, window=None, mode="sliding", mask_a=None, mask_b=None, normalize=True):
    """(values, indices) per the specification, float64."""
    B, C, H, W = feat_a.shape
    xa, xb = feat_a.double(), feat_b.double()
    if normalize:
        xa = xa / xa.norm(dim=1, keepdim=True).clamp_min(1e-12)
        xb = xb / xb.norm(dim=1, keepdim=True).clamp_min(1e-12)
    xa, xb = xa.flatten(2), xb.flatten(2)  # (B, C, N)
    values = torch.zeros(B, H * W, dtype=torch.float64)
    indices = torch.full((B, H * W), -1, dtype=torch.int64)
    for b in range(B):
        for h in range(H):
            for w in range(W):
                p = h * W + w
                if mask_a is not None and not mask_a[b, h, w]:
                    continue
                best, best_q = None, -1
                for q in candidate_set(h, w, H, W, window, mode):
                    if mask_b is not None and not mask_b[b].flatten()[q]:
                        continue
                    s = float(xa[b, :, p] @ xb[b, :, q])
                    if best is None or s > best:  # strict: ties keep the lowest q
                        best, best_q = s, q
                if best_q >= 0:
                    values[b, p], indices[b, p] = best, best_q
    return values.view(B, H, W), indices.view(B, H, W)
