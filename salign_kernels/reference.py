"""The pure-PyTorch implementation of every op: the oracle for tests and the baseline of benchmarks.

It is written the way a user would write it: normalise, ``bmm`` (or ``unfold`` for sliding windows),
masked ``max``. Autograd through ``max`` gives exactly the gradient fixed by the specification
(through ``value[p] = s(p, index[p])`` only), so nothing here needs a custom backward.

The functions here do not validate their arguments; the public API in :mod:`salign_kernels.functional`
does that before it calls them.

Notation: features ``(B, C, H, W)``; pixels flattened row-major, ``p = h * W + w``, ``N = H * W``;
``s(p, q) = <xa_p, xb_q>`` with ``x`` L2-normalised over C when ``normalize=True``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._dtypes import accumulation_dtype

NORMALIZE_EPS = 1e-12  # the eps of torch.nn.functional.normalize

Match = Tuple[torch.Tensor, torch.Tensor]


def prepare_features(feat: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Cast ``feat`` to its accumulation dtype and L2-normalise each pixel's C-vector when asked.

    ``x_p / max(||x_p||, 1e-12)``, the formula of ``torch.nn.functional.normalize``.

    Shape: ``(B, C, H, W) -> (B, C, H, W)``, float32 (float64 stays float64).
    """
    feat = feat.to(accumulation_dtype(feat.dtype))
    if normalize:
        feat = F.normalize(feat, p=2.0, dim=1, eps=NORMALIZE_EPS)
    return feat


def _finish(values: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor, shape) -> Match:
    """Give invalid queries ``value = 0``, ``index = -1`` and reshape both to ``(B, H, W)``."""
    values = values.masked_fill(~valid, 0.0)
    indices = indices.masked_fill(~valid, -1)
    return values.reshape(shape), indices.reshape(shape)


def _query_valid(mask_a: Optional[torch.Tensor], has_candidate: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` bool: the query is unmasked and at least one candidate is left."""
    if mask_a is None:
        return has_candidate
    return has_candidate & mask_a.reshape(has_candidate.shape[0], -1)


def dense_match(
    feat_a: torch.Tensor,
    feat_b: torch.Tensor,
    mask_a: Optional[torch.Tensor] = None,
    mask_b: Optional[torch.Tensor] = None,
    normalize: bool = True,
) -> Match:
    """Best match in all of ``feat_b`` for every pixel of ``feat_a``.

    ``value[p] = max_q s(p, q)``, ``index[p] = min argmax`` over unmasked candidates ``q``.
    Builds the full ``(B, N, N)`` similarity matrix: O(B N^2) memory.

    Returns ``(values, indices)``, each ``(B, H, W)``; values float32 (float64 for float64 input),
    indices int64 with -1 for queries that are masked out or have no candidate.
    """
    B, _, H, W = feat_a.shape
    with torch.autocast(feat_a.device.type, enabled=False):
        xa = prepare_features(feat_a, normalize).flatten(2).transpose(1, 2)  # (B, N, C)
        xb = prepare_features(feat_b, normalize).flatten(2)  # (B, C, N)
        sim = torch.bmm(xa, xb)  # (B, N, N): sim[b, p, q] = s(p, q)
        if mask_b is None:
            has_candidate = torch.ones(B, H * W, dtype=torch.bool, device=feat_a.device)
        else:
            candidates = mask_b.reshape(B, 1, H * W)
            sim = sim.masked_fill(~candidates, float("-inf"))
            has_candidate = candidates.any(dim=-1).expand(B, H * W)
        values, indices = sim.max(dim=-1)  # torch.max returns the first (lowest) index on ties
    return _finish(values, indices, _query_valid(mask_a, has_candidate), (B, H, W))


def sliding_window_match(
    feat_a: torch.Tensor,
    feat_b: torch.Tensor,
    window: int,
    mask_a: Optional[torch.Tensor] = None,
    mask_b: Optional[torch.Tensor] = None,
    normalize: bool = True,
) -> Match:
    """Best match in the ``window x window`` neighbourhood centred on the same (h, w) of ``feat_b``.

    ``window`` is odd, ``r = window // 2``; candidates ``(h + dy, w + dx)`` for ``|dy|, |dx| <= r``
    that lie inside the map (no padding). Uses ``unfold``: O(B C window^2 N) memory.
    """
    B, C, H, W = feat_a.shape
    K, r = window * window, window // 2
    device = feat_a.device
    with torch.autocast(device.type, enabled=False):
        xa = prepare_features(feat_a, normalize).reshape(B, C, 1, H * W)
        xb = prepare_features(feat_b, normalize)
        neighbours = F.unfold(xb, window, padding=r).view(B, C, K, H * W)  # zero outside the map
        sim = (xa * neighbours).sum(dim=1)  # (B, K, N): offset o = (dy + r) * window + (dx + r)
        # Which offsets are real candidates: inside the map and, if given, unmasked in b.
        present = torch.ones(1, 1, H, W, device=device) if mask_b is None else mask_b[:, None].to(xb.dtype)
        candidates = F.unfold(present, window, padding=r) > 0.5  # (1 or B, K, N)
        sim = sim.masked_fill(~candidates, float("-inf"))
        # Row-major offset order is also increasing flat index, so the first max is the lowest q.
        values, offsets = sim.max(dim=1)  # (B, N)
        has_candidate = candidates.any(dim=1).expand(B, H * W)
    rows = torch.arange(H, device=device).repeat_interleave(W)
    cols = torch.arange(W, device=device).repeat(H)
    dy = torch.div(offsets, window, rounding_mode="floor") - r
    dx = offsets % window - r
    indices = (rows + dy) * W + (cols + dx)
    return _finish(values, indices, _query_valid(mask_a, has_candidate), (B, H, W))


def _to_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """``(B, D, Hp, Wp) -> (B * nh * nw, window^2, D)``: pixels of each window, row-major."""
    B, D, Hp, Wp = x.shape
    nh, nw = Hp // window, Wp // window
    x = x.view(B, D, nh, window, nw, window).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B * nh * nw, window * window, D)


def _from_windows(x: torch.Tensor, B: int, nh: int, nw: int, window: int) -> torch.Tensor:
    """Inverse of :func:`_to_windows` for one value per pixel: ``(B*nh*nw, window^2) -> (B, Hp, Wp)``."""
    x = x.reshape(B, nh, nw, window, window).permute(0, 1, 3, 2, 4)
    return x.reshape(B, nh * window, nw * window)


def partition_window_match(
    feat_a: torch.Tensor,
    feat_b: torch.Tensor,
    window: int,
    mask_a: Optional[torch.Tensor] = None,
    mask_b: Optional[torch.Tensor] = None,
    normalize: bool = True,
) -> Match:
    """Best match inside the same ``window x window`` tile of ``feat_b``.

    The map is tiled from (0, 0); edge tiles are smaller where H or W is not a multiple of
    ``window``. The maps are zero-padded to whole tiles and the padding is masked out of the
    candidates, then one ``bmm`` per tile.
    """
    B, C, H, W = feat_a.shape
    nh, nw = math.ceil(H / window), math.ceil(W / window)
    pad = (0, nw * window - W, 0, nh * window - H)
    device = feat_a.device
    with torch.autocast(device.type, enabled=False):
        wa = _to_windows(F.pad(prepare_features(feat_a, normalize), pad), window)
        wb = _to_windows(F.pad(prepare_features(feat_b, normalize), pad), window)
        sim = torch.bmm(wa, wb.transpose(1, 2))  # (B * nh * nw, K, K)
        present = torch.ones(B, 1, H, W, dtype=torch.bool, device=device)
        if mask_b is not None:
            present = present & mask_b[:, None]
        candidates = _to_windows(F.pad(present, pad), window).transpose(1, 2)  # (B*nh*nw, 1, K)
        sim = sim.masked_fill(~candidates, float("-inf"))
        values, local = sim.max(dim=-1)  # (B * nh * nw, K); window-local row-major = flat order
        has_candidate = candidates.any(dim=-1).expand_as(local)
    # Flat index in b of each window-local offset.
    origin_row = torch.arange(nh, device=device).view(1, nh, 1, 1) * window
    origin_col = torch.arange(nw, device=device).view(1, 1, nw, 1) * window
    local = local.view(B, nh, nw, window * window)
    indices = (origin_row + local // window) * W + origin_col + local % window
    crop = (slice(None), slice(0, H), slice(0, W))
    values = _from_windows(values, B, nh, nw, window)[crop]
    indices = _from_windows(indices.reshape(-1, window * window), B, nh, nw, window)[crop]
    has_candidate = _from_windows(has_candidate, B, nh, nw, window)[crop]
    valid = _query_valid(mask_a, has_candidate.reshape(B, H * W))
    return _finish(values.reshape(B, H * W), indices.reshape(B, H * W), valid, (B, H, W))


def window_match(
    feat_a: torch.Tensor,
    feat_b: torch.Tensor,
    window: int,
    mode: str = "sliding",
    mask_a: Optional[torch.Tensor] = None,
    mask_b: Optional[torch.Tensor] = None,
    normalize: bool = True,
) -> Match:
    """Windowed matching: ``mode="sliding"`` (centred neighbourhood) or ``"partition"`` (same tile)."""
    fn = sliding_window_match if mode == "sliding" else partition_window_match
    return fn(feat_a, feat_b, window, mask_a, mask_b, normalize)


def match(
    feat_a: torch.Tensor,
    feat_b: torch.Tensor,
    window: Optional[int] = None,
    mode: str = "sliding",
    mask_a: Optional[torch.Tensor] = None,
    mask_b: Optional[torch.Tensor] = None,
    normalize: bool = True,
) -> Match:
    """Dense matching for ``window=None``, else windowed matching."""
    if window is None:
        return dense_match(feat_a, feat_b, mask_a, mask_b, normalize)
    return window_match(feat_a, feat_b, window, mode, mask_a, mask_b, normalize)


def alignment_loss(directions: Sequence[Match], reduction: str = "mean") -> torch.Tensor:
    """The LA/WLA loss from the matches of one or two directions (a -> b, then b -> a).

    Per query pixel ``l_p = |1 - value[p]|`` over valid queries (index >= 0), 0 elsewhere.
    ``"mean"`` divides each direction's sum by its number of valid queries (0 when there is none),
    ``"sum"`` keeps the sum; two directions are averaged. ``"none"`` returns ``(B, H, W)``, or
    ``(B, 2, H, W)`` for two directions (channel 0 is a -> b).

    Every backend shares this reduction: backends differ only in how they match.
    """
    per_pixel = [torch.where(idx >= 0, (1.0 - val).abs(), 0.0) for val, idx in directions]
    if reduction == "none":
        return per_pixel[0] if len(per_pixel) == 1 else torch.stack(per_pixel, dim=1)
    if reduction == "sum":
        totals = [loss.sum() for loss in per_pixel]
    else:  # "mean"; the clamp keeps an all-masked batch at 0 without a host sync
        totals = [
            loss.sum() / (idx >= 0).sum().clamp_min(1).to(loss.dtype)
            for loss, (_, idx) in zip(per_pixel, directions)
        ]
    return totals[0] if len(totals) == 1 else (totals[0] + totals[1]) / 2


def local_alignment_loss(
    feat_a: torch.Tensor,
    feat_b: torch.Tensor,
    window: Optional[int] = None,
    window_mode: str = "sliding",
    symmetric: bool = False,
    mask_a: Optional[torch.Tensor] = None,
    mask_b: Optional[torch.Tensor] = None,
    normalize: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """The LA loss (``window=None``) or the WLA loss, computed with the reference matching.

    ``symmetric=True`` adds the direction b -> a: queries in b, candidates in a, masks swapped.
    """
    directions = [match(feat_a, feat_b, window, window_mode, mask_a, mask_b, normalize)]
    if symmetric:
        directions.append(match(feat_b, feat_a, window, window_mode, mask_b, mask_a, normalize))
    return alignment_loss(directions, reduction)


def global_positional_loss(
    pred: torch.Tensor, pos_a: torch.Tensor, pos_b: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """L1 between the predicted signed offset and the true one: ``|pred - (pos_b - pos_a)|``."""
    return F.l1_loss(pred, (pos_b - pos_a).to(pred.dtype), reduction=reduction)
