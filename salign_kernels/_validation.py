"""Argument checks of the public API.

Every check raises at once, before any work, with a message that names the argument, quotes the
value received and says what is allowed: ``TypeError`` for a wrong type or dtype, ``ValueError``
for a wrong value or shape.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._dtypes import SUPPORTED_DTYPES

WINDOW_MODES = ("sliding", "partition")
REDUCTIONS = ("none", "mean", "sum")
BACKEND_NAMES = ("auto", "reference", "cpp", "triton")


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


def check_window_option(window, mode: str) -> None:
    """The checks of ``window`` that need no tensor: None, or a positive int, odd when sliding."""
    check_choice(mode, "window_mode", WINDOW_MODES)
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int or None (dense matching); got {_describe(window)}")
    if window < 1:
        raise ValueError(f"window must be >= 1 (use window=None for dense matching); got {window}")
    if mode == "sliding" and window % 2 == 0:
        raise ValueError(
            f"window must be odd in sliding mode (the window is centred on the query); got {window}; "
            "partition windows may be even"
        )


def check_window_fits(window: Optional[int], height: int, width: int) -> None:
    """A window larger than the map is a mistake: dense matching is ``window=None``."""
    if window is not None and window > max(height, width):
        raise ValueError(
            f"window must be at most max(H, W) = {max(height, width)} for feature maps of size "
            f"{height} x {width}; got {window} (use window=None for dense matching)"
        )


def check_features(feat_a, feat_b) -> None:
    """Two ``(B, C, H, W)`` floating tensors of one shape, dtype and device, with no zero size."""
    for name, feat in (("feat_a", feat_a), ("feat_b", feat_b)):
        if not isinstance(feat, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {_describe(feat)}")
        if feat.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, C, H, W); got {_describe(feat)}")
        if feat.dtype not in SUPPORTED_DTYPES:
            allowed = ", ".join(str(d) for d in SUPPORTED_DTYPES)
            raise TypeError(f"{name} must have a floating dtype ({allowed}); got {feat.dtype}")
        if feat.numel() == 0:
            raise ValueError(f"{name} must not be empty; got {_describe(feat)}")
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
    """None, or a bool ``(B, H, W)`` tensor on the features' device."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor or None; got {_describe(mask)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool; got {mask.dtype}")
    B, _, H, W = feat.shape
    if tuple(mask.shape) != (B, H, W):
        raise ValueError(f"{name} must have shape (B, H, W) = {(B, H, W)}; got {tuple(mask.shape)}")
    if mask.device != feat.device:
        raise ValueError(f"{name} must be on the features' device {feat.device}; got {mask.device}")


def check_match_inputs(feat_a, feat_b, mask_a, mask_b, normalize, window=None, mode="sliding") -> None:
    """Every check of a matching call, in the order a reader would expect the errors."""
    check_features(feat_a, feat_b)
    check_mask(mask_a, "mask_a", feat_a)
    check_mask(mask_b, "mask_b", feat_a)
    check_bool(normalize, "normalize")
    check_window_option(window, mode)
    check_window_fits(window, feat_a.shape[2], feat_a.shape[3])


def check_positional(pred, pos_a, pos_b) -> None:
    """``pred``, ``pos_a`` and ``pos_b``: floating tensors of one shape ``(B,)`` on one device."""
    for name, t in (("pred", pred), ("pos_a", pos_a), ("pos_b", pos_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {_describe(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype; got {t.dtype}")
        if t.dim() != 1 or t.numel() == 0:
            raise ValueError(f"{name} must be a non-empty 1-D tensor (B,); got {_describe(t)}")
    for name, t in (("pos_a", pos_a), ("pos_b", pos_b)):
        if t.shape != pred.shape:
            raise ValueError(f"{name} must have the shape of pred {tuple(pred.shape)}; got {tuple(t.shape)}")
        if t.device != pred.device:
            raise ValueError(f"{name} must be on pred's device {pred.device}; got {t.device}")
