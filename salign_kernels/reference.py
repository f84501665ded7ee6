"""The pure-PyTorch implementation of every op: the oracle for tests, the baseline of benchmarks, and
the fallback backend.

It is written the way a user would write it: normalise, flatten + ``bmm`` + masked ``max`` for dense
matching, pad + ``Tensor.unfold`` on each spatial axis for sliding windows, a reshape into tiles +
``bmm`` for partition windows. Autograd through ``max`` gives exactly the gradient fixed by the
specification (through ``value[p] = s(p, index[p])`` only), so nothing here needs a custom backward.

The functions here do not validate their arguments; the public API in :mod:`salign_kernels.functional`
does that before it calls them.

Notation: features ``(B, C, *spatial)`` with ``spatial = (H, W)`` or ``(D, H, W)``; voxels flattened
row-major, ``p = (d * H + h) * W + w``, ``N = D * H * W``; ``s(p, q) = <xa_p, xb_q>`` with ``x``
L2-normalised over C when ``normalize=True``. A window is one size per spatial axis (an int means
the same size on every axis).
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._backend import BackendStatus
from ._matching import Matching, expand_window
from ._numerics import NORMALIZE_EPS, accumulation_dtype
from ._reduction import alignment_loss, positional_loss

Match = Tuple[torch.Tensor, torch.Tensor]


def _no_autocast(device: torch.device):
    """Autocast off (the losses accumulate in float32 whatever autocast says); nothing to turn off on
    devices autocast does not know (e.g. ``meta``, for shape inference)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def normalize_voxels(x: torch.Tensor) -> torch.Tensor:
    """``x / max(||x||, eps)`` over dim 1 (the formula of ``torch.nn.functional.normalize``), with
    the norm computed on ``x`` scaled by a power of two per voxel so that it can neither overflow
    (``|x| >~ 1.8e19`` in float32) nor underflow (``|x| <~ 1e-19``).

    Each voxel is multiplied by ``2^-e``, ``e`` the exponent of its largest ``|x|``: exact in
    floating point, so for features whose squares neither overflow nor underflow the result is
    bitwise that of ``F.normalize``. The clamp compares the true norm with ``eps``:
    ``||x 2^-e|| < eps 2^-e``. A voxel holding NaN or Inf is not scaled (and comes out NaN).
    """
    largest = x.detach().abs().amax(dim=1, keepdim=True)
    _, exponent = torch.frexp(torch.where(torch.isfinite(largest), largest, 0.0))  # 0 -> exponent 0
    # 2^-e stays finite: exponents clamped to the dtype's normal range (denormal voxels are scaled
    # up as far as that allows, which is enough for their squares not to underflow).
    limit = int(math.log2(torch.finfo(x.dtype).max)) - 2
    scale = torch.exp2(-exponent.clamp(-limit, limit).to(x.dtype))
    scaled = x * scale
    norm = torch.linalg.vector_norm(scaled, dim=1, keepdim=True)
    return scaled / torch.maximum(norm, NORMALIZE_EPS * scale)


def prepare_features(feat: torch.Tensor, normalize: bool, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cast ``feat`` to its accumulation dtype, zero the voxels ``mask`` removes and L2-normalise
    each voxel's C-vector when asked (:func:`normalize_voxels`).

    A masked voxel is neither query nor candidate: zeroing it before anything else keeps a NaN or
    Inf there out of every product and every gradient.

    Shape: ``(B, C, *spatial) -> (B, C, *spatial)``, float32 (float64 stays float64); ``mask``
    ``(B, *spatial)``.
    """
    feat = feat.to(accumulation_dtype(feat.dtype))
    if mask is not None:
        feat = torch.where(mask[:, None], feat, 0.0)
    if normalize:
        feat = normalize_voxels(feat)
    return feat


def _first_where(candidates: torch.Tensor) -> torch.Tensor:
    """The position of the first True along the last axis (0 when there is none)."""
    return candidates.to(torch.uint8).argmax(dim=-1)


def _best(sim: torch.Tensor, candidates: torch.Tensor):
    """``(values, positions)`` of the max over the last axis among the candidates, as ``torch.max``
    gives them (NaN wins, lowest position on ties), with every non-candidate at -inf; where every
    candidate is -inf itself (raw products that overflow), the first candidate."""
    sim = sim.masked_fill(~candidates, float("-inf"))
    values, positions = sim.max(dim=-1)
    all_minus_inf = values == float("-inf")
    return values, torch.where(all_minus_inf, _first_where(candidates).expand_as(positions), positions)


def _finish(values: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor, shape) -> Match:
    """Give invalid queries ``value = 0``, ``index = -1`` and reshape both to ``(B, *spatial)``."""
    values = values.masked_fill(~valid, 0.0)
    indices = indices.masked_fill(~valid, -1)
    return values.reshape(shape), indices.reshape(shape)


def _query_valid(mask_a: Optional[torch.Tensor], has_candidate: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` bool: the query is unmasked and at least one candidate is left."""
    if mask_a is None:
        return has_candidate
    return has_candidate & mask_a.reshape(has_candidate.shape[0], -1)


def _out_shape(feat: torch.Tensor):
    return (feat.shape[0], *feat.shape[2:])


def dense_match(
    feat_a: torch.Tensor,
    feat_b: torch.Tensor,
    mask_a: Optional[torch.Tensor] = None,
    mask_b: Optional[torch.Tensor] = None,
    normalize: bool = True,
) -> Match:
    """Best match in all of ``feat_b`` for every voxel of ``feat_a``.

    ``value[p] = max_q s(p, q)``, ``index[p] = min argmax`` over unmasked candidates ``q``.
    Builds the full ``(B, N, N)`` similarity matrix: O(B N^2) memory.

    Returns ``(values, indices)``, each ``(B, *spatial)``; values float32 (float64 for float64
    input), indices int64 flat indices, -1 for queries that are masked out or have no candidate.
    """
    B, N = feat_a.shape[0], math.prod(feat_a.shape[2:])
    with _no_autocast(feat_a.device):
        xa = prepare_features(feat_a, normalize, mask_a).flatten(2).transpose(1, 2)  # (B, N, C)
        xb = prepare_features(feat_b, normalize, mask_b).flatten(2)  # (B, C, N)
        sim = torch.bmm(xa, xb)  # (B, N, N): sim[b, p, q] = s(p, q)
        if mask_b is None:
            candidates = torch.ones(1, 1, xb.shape[-1], dtype=torch.bool, device=feat_a.device)
        else:
            candidates = mask_b.reshape(B, 1, -1)
        values, indices = _best(sim, candidates)  # torch.max returns the first (lowest) index on ties
        has_candidate = candidates.any(dim=-1).expand(B, N)
    return _finish(values, indices, _query_valid(mask_a, has_candidate), _out_shape(feat_a))


def _neighbourhoods(x: torch.Tensor, window: Sequence[int], value) -> torch.Tensor:
    """``(B, C, *spatial) -> (B, C, *spatial, *window)``: every voxel's centred neighbourhood, the
    map padded with ``value`` (a view of the padded map: ``unfold`` on each spatial axis)."""
    pad = []
    for k in reversed(window):  # F.pad lists the last axis first
        pad += [k // 2, k // 2]
    x = F.pad(x, pad, value=value)
    for axis, k in enumerate(window):
        x = x.unfold(2 + axis, k, 1)
    return x


def sliding_window_match(
    feat_a: torch.Tensor,
    feat_b: torch.Tensor,
    window,
    mask_a: Optional[torch.Tensor] = None,
    mask_b: Optional[torch.Tensor] = None,
    normalize: bool = True,
) -> Match:
    """Best match in the window centred on the same voxel of ``feat_b``.

    ``window`` is an odd int or one odd size per spatial axis, ``r_i = k_i // 2``; candidates at
    offsets ``|o_i| <= r_i`` that lie inside the map (no padding). Uses ``unfold``: O(B C N prod(k))
    memory.
    """
    B, C = feat_a.shape[:2]
    spatial = tuple(feat_a.shape[2:])
    window = expand_window(window, len(spatial))
    N, K = math.prod(spatial), math.prod(window)
    device = feat_a.device
    with _no_autocast(device):
        xa = prepare_features(feat_a, normalize, mask_a).reshape(B, C, N, 1)
        xb = prepare_features(feat_b, normalize, mask_b)
        neighbours = _neighbourhoods(xb, window, 0.0).reshape(B, C, N, K)  # zero outside the map
        sim = (xa * neighbours).sum(dim=1)  # (B, N, K): offsets in row-major order
        # Which offsets are real candidates: inside the map and, if given, unmasked in b.
        present = torch.ones(1, 1, *spatial, dtype=torch.bool, device=device) if mask_b is None else mask_b[:, None]
        candidates = _neighbourhoods(present, window, False).reshape(present.shape[0], N, K)
        # Row-major offset order is also increasing flat index, so the first max is the lowest q.
        values, offsets = _best(sim, candidates)  # (B, N)
        has_candidate = candidates.any(dim=-1).expand(B, N)
    # The flat index in b of each offset: the neighbourhoods of the flat index map.
    flat = torch.arange(N, device=device).reshape(1, 1, *spatial)
    flat_neighbours = _neighbourhoods(flat, window, -1).reshape(1, N, K).expand(B, N, K)
    indices = torch.gather(flat_neighbours, 2, offsets[..., None])[..., 0]
    return _finish(values, indices, _query_valid(mask_a, has_candidate), _out_shape(feat_a))


def _tiles(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """``(B, E, *padded) -> (B * tiles, prod(window), E)``: the voxels of each tile, row-major within
    the tile, tiles in row-major order (``padded`` holds whole tiles)."""
    B, E = x.shape[:2]
    counts = [size // k for size, k in zip(x.shape[2:], window)]
    split = [B, E]
    for n, k in zip(counts, window):
        split += [n, k]
    S = len(window)
    order = [0] + [2 + 2 * i for i in range(S)] + [3 + 2 * i for i in range(S)] + [1]
    return x.reshape(split).permute(order).reshape(B * math.prod(counts), math.prod(window), E)


def _untile(x: torch.Tensor, B: int, counts: Sequence[int], window: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`_tiles` for one value per voxel: ``(B * tiles, prod(window)) -> (B, *padded)``."""
    S = len(window)
    x = x.reshape(B, *counts, *window)
    order = [0]
    for i in range(S):
        order += [1 + i, 1 + S + i]
    return x.permute(order).reshape(B, *(n * k for n, k in zip(counts, window)))


def partition_window_match(
    feat_a: torch.Tensor,
    feat_b: torch.Tensor,
    window,
    mask_a: Optional[torch.Tensor] = None,
    mask_b: Optional[torch.Tensor] = None,
    normalize: bool = True,
) -> Match:
    """Best match inside the same tile of ``feat_b``.

    The map is tiled from the origin with tiles of ``window`` (an int or one size per axis); edge
    tiles are smaller where a size does not divide the map. The maps are zero-padded to whole tiles
    and the padding is masked out of the candidates, then one ``bmm`` per tile.
    """
    B = feat_a.shape[0]
    spatial = tuple(feat_a.shape[2:])
    window = expand_window(window, len(spatial))
    counts = [math.ceil(size / k) for size, k in zip(spatial, window)]
    pad = []
    for size, n, k in zip(reversed(spatial), reversed(counts), reversed(window)):
        pad += [0, n * k - size]
    device = feat_a.device
    with _no_autocast(device):
        ta = _tiles(F.pad(prepare_features(feat_a, normalize, mask_a), pad), window)
        tb = _tiles(F.pad(prepare_features(feat_b, normalize, mask_b), pad), window)
        sim = torch.bmm(ta, tb.transpose(1, 2))  # (B * tiles, K, K)
        present = torch.ones(B, 1, *spatial, dtype=torch.bool, device=device)
        if mask_b is not None:
            present = present & mask_b[:, None]
        candidates = _tiles(F.pad(present, pad), window).transpose(1, 2)  # (B * tiles, 1, K)
        values, local = _best(sim, candidates)  # (B * tiles, K); tile-local row-major = flat order
        has_candidate = candidates.any(dim=-1).expand_as(local)
    # The flat index in b of each tile-local offset: the flat index map, cut into the same tiles.
    flat = torch.arange(math.prod(spatial), device=device).reshape(1, 1, *spatial)
    flat_tiles = _tiles(F.pad(flat, pad), window)[..., 0].repeat(B, 1)  # (B * tiles, K)
    indices = torch.gather(flat_tiles, 1, local)
    crop = (slice(None),) + tuple(slice(0, size) for size in spatial)
    values = _untile(values, B, counts, window)[crop]
    indices = _untile(indices, B, counts, window)[crop]
    has_candidate = _untile(has_candidate, B, counts, window)[crop]
    valid = _query_valid(mask_a, has_candidate.reshape(B, -1))
    N = math.prod(spatial)
    return _finish(values.reshape(B, N), indices.reshape(B, N), valid, _out_shape(feat_a))


def window_match(
    feat_a: torch.Tensor,
    feat_b: torch.Tensor,
    window,
    mode: str = "sliding",
    mask_a: Optional[torch.Tensor] = None,
    mask_b: Optional[torch.Tensor] = None,
    normalize: bool = True,
) -> Match:
    """Windowed matching: ``mode="sliding"`` (centred neighbourhood) or ``"partition"`` (same tile);
    ``window=None`` is dense matching."""
    if window is None:
        return dense_match(feat_a, feat_b, mask_a, mask_b, normalize)
    fn = sliding_window_match if mode == "sliding" else partition_window_match
    return fn(feat_a, feat_b, window, mask_a, mask_b, normalize)


def local_alignment_loss(
    feat_a: torch.Tensor,
    feat_b: torch.Tensor,
    window=None,
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
    directions = [window_match(feat_a, feat_b, window, window_mode, mask_a, mask_b, normalize)]
    if symmetric:
        directions.append(window_match(feat_b, feat_a, window, window_mode, mask_b, mask_a, normalize))
    return alignment_loss(directions, reduction)


def global_positional_loss(
    pred: torch.Tensor, pos_a: torch.Tensor, pos_b: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """L1 between the predicted signed offset and the true one: ``|pred - (pos_b - pos_a)|``."""
    return positional_loss(pred, pos_a, pos_b, reduction)


# --- the fallback backend (see salign_kernels._backend) ------------------------------------------

name = "reference"


def status() -> BackendStatus:
    return BackendStatus(True)


def supports(device) -> bool:
    return True


def unsupported(feat_a: torch.Tensor, matching: Matching) -> Optional[str]:
    return None


def fuses_symmetric(feat_a: torch.Tensor, matching: Matching) -> bool:
    return False


def match(feat_a: torch.Tensor, feat_b: torch.Tensor, matching: Matching) -> Match:
    """The backend entry point: the matching that ``matching`` describes."""
    return window_match(feat_a, feat_b, matching.window, matching.mode, matching.mask_a, matching.mask_b,
                        matching.normalize)


def match_symmetric(feat_a, feat_b, matching: Matching):  # never called: fuses_symmetric is False
    raise NotImplementedError
