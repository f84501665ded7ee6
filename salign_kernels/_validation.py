"""Argument checks of the public API.

Every check raises at once, before any work, with a message that names the argument, quotes the
value received and says what is allowed: ``TypeError`` for a wrong type or dtype, ``ValueError``
for a wrong value or shape.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._matching import SPATIAL_RANKS, WINDOW_MODES, Matching, matching_of
from ._numerics import SUPPORTED_DTYPES

REDUCTIONS = ("none", "mean", "sum")

_AXES = {2: "(H, W)", 3: "(D, H, W)"}


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    return f"{value!r} ({type(value).__name__})"


def check_choice(value, name: str, allowed: Sequence[str]) -> None:
    """``value`` must be one of the strings in ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def check_bool(value, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {_describe(value)}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_window_option(window, mode: str, name: str = "window") -> None:
    """The checks of ``window`` that need no tensor: None, a positive int or a tuple of positive
    ints (one per spatial axis), odd in sliding mode."""
    check_choice(mode, "window_mode", WINDOW_MODES)
    if window is None:
        return
    if isinstance(window, (tuple, list)):
        if not all(_is_int(k) for k in window):
            raise TypeError(f"{name} must be an int or a tuple of ints (one per spatial axis); got {window!r}")
        if len(window) not in SPATIAL_RANKS:
            raise ValueError(
                f"{name} must have one size per spatial axis, 2 (H, W) or 3 (D, H, W); got {tuple(window)!r}"
            )
        sizes = tuple(window)
    elif _is_int(window):
        sizes = (window,)
    else:
        raise TypeError(
            f"{name} must be an int, a tuple of ints (one per spatial axis) or None (dense matching); "
            f"got {_describe(window)}"
        )
    if min(sizes) < 1:
        raise ValueError(f"{name} must be >= 1 (use {name}=None for dense matching); got {window!r}")
    if mode == "sliding" and any(k % 2 == 0 for k in sizes):
        raise ValueError(
            f"{name} must be odd in sliding mode (the window is centred on the query); got {window!r}; "
            "partition windows may be even"
        )


def check_window_fits(window, spatial: Sequence[int], name: str = "window") -> None:
    """A tuple has one size per spatial axis; no size exceeds the largest spatial size (a window
    larger than the map is a mistake: dense matching is ``window=None``)."""
    if window is None:
        return
    ndim = len(spatial)
    if isinstance(window, (tuple, list)) and len(window) != ndim:
        raise ValueError(
            f"{name} must have one size per spatial axis {_AXES[ndim]}, {ndim} in all, for feature maps "
            f"of spatial size {' x '.join(map(str, spatial))}; got {tuple(window)!r}"
        )
    largest = max(spatial)
    sizes = tuple(window) if isinstance(window, (tuple, list)) else (window,)
    if max(sizes) > largest:
        axes = _AXES[ndim].replace("(", "").replace(")", "")
        raise ValueError(
            f"{name} must be at most max({axes}) = {largest} for feature maps of size "
            f"{' x '.join(map(str, spatial))}; got {window!r} (use {name}=None for dense matching)"
        )


def check_feature_map(feat, name: str) -> None:
    """One ``(B, C, H, W)`` or ``(B, C, D, H, W)`` floating tensor with no zero size."""
    if not isinstance(feat, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {_describe(feat)}")
    if feat.dim() - 2 not in SPATIAL_RANKS:
        raise ValueError(
            f"{name} must be a 4-D tensor (B, C, H, W) or a 5-D tensor (B, C, D, H, W); got {_describe(feat)}"
        )
    if feat.dtype not in SUPPORTED_DTYPES:
        allowed = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name} must have a floating dtype ({allowed}); got {feat.dtype}")
    if feat.numel() == 0:
        raise ValueError(f"{name} must not be empty; got {_describe(feat)}")


def check_features(feat_a, feat_b) -> None:
    """Two feature maps of one shape, dtype and device."""
    check_feature_map(feat_a, "feat_a")
    check_feature_map(feat_b, "feat_b")
    if feat_a.shape != feat_b.shape:
        raise ValueError(
            f"feat_a and feat_b must have the same shape; got {tuple(feat_a.shape)} and {tuple(feat_b.shape)}"
        )
    if feat_a.dtype != feat_b.dtype:
        raise TypeError(f"feat_a and feat_b must have the same dtype; got {feat_a.dtype} and {feat_b.dtype}")
    if feat_a.device != feat_b.device:
        raise ValueError(
            f"feat_a and feat_b must be on the same device; got {feat_a.device} and {feat_b.device}"
        )


def check_mask(mask, name: str, feat: torch.Tensor) -> None:
    """None, or a bool ``(B, *spatial)`` tensor on the features' device."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor or None; got {_describe(mask)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool; got {mask.dtype}")
    expected = (feat.shape[0], *feat.shape[2:])
    if tuple(mask.shape) != expected:
        axes = "(B, " + _AXES[feat.dim() - 2][1:]
        raise ValueError(f"{name} must have shape {axes} = {expected}; got {tuple(mask.shape)}")
    if mask.device != feat.device:
        raise ValueError(f"{name} must be on the features' device {feat.device}; got {mask.device}")


def check_match_inputs(feat_a, feat_b, mask_a, mask_b, normalize, window=None, mode="sliding") -> Matching:
    """Every check of a matching call, in the order a reader would expect the errors; returns the
    call's :class:`~salign_kernels._matching.Matching`."""
    check_features(feat_a, feat_b)
    check_mask(mask_a, "mask_a", feat_a)
    check_mask(mask_b, "mask_b", feat_a)
    check_bool(normalize, "normalize")
    check_window_option(window, mode)
    check_window_fits(window, feat_a.shape[2:])
    return matching_of(feat_a, window, mode, mask_a, mask_b, normalize)


def check_positional(pred, pos_a, pos_b) -> None:
    """``pred``, ``pos_a`` and ``pos_b``: floating tensors of one shape, ``(B,)`` or ``(B, K)``, on
    one device."""
    for name, t in (("pred", pred), ("pos_a", pos_a), ("pos_b", pos_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {_describe(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype; got {t.dtype}")
        if t.dim() not in (1, 2) or t.numel() == 0:
            raise ValueError(f"{name} must be a non-empty (B,) or (B, K) tensor; got {_describe(t)}")
    for name, t in (("pos_a", pos_a), ("pos_b", pos_b)):
        if t.shape != pred.shape:
            raise ValueError(f"{name} must have the shape of pred {tuple(pred.shape)}; got {tuple(t.shape)}")
        if t.device != pred.device:
            raise ValueError(f"{name} must be on pred's device {pred.device}; got {t.device}")
