"""Checks of the data options, shared by the pair datasets and the loaders.

Each returns the value in its canonical form or raises at once, naming the argument and quoting the
value received: ``TypeError`` for a wrong type, ``ValueError`` for a wrong value.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_int(value, name: str, minimum: int) -> int:
    """``value`` as an int ``>= minimum``."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int; got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return int(value)


def check_per_axis(value, name: str, minimum: int, ndim: int = 3) -> Tuple[int, ...]:
    """An int (the same on every axis) or ``ndim`` ints, each ``>= minimum``, as an ``ndim``-tuple."""
    if _is_int(value):
        return (check_int(value, name, minimum),) * ndim
    if not isinstance(value, (tuple, list)) or not all(_is_int(v) for v in value):
        raise TypeError(f"{name} must be an int or a tuple of {ndim} ints (one per axis); got {value!r}")
    if len(value) != ndim:
        raise ValueError(f"{name} must have one entry per axis ({ndim}); got {tuple(value)!r}")
    if min(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum} on every axis; got {tuple(value)!r}")
    return tuple(int(v) for v in value)


def check_spacing(value, name: str = "spacing", ndim: int = 3) -> Optional[Tuple[float, ...]]:
    """None, or a voxel size in mm (> 0): one number for every axis, or ``ndim`` numbers."""
    if value is None:
        return None
    values = (value,) * ndim if _is_number(value) else value
    if not isinstance(values, (tuple, list)) or not all(_is_number(v) for v in values):
        raise TypeError(f"{name} must be None, a number or a tuple of {ndim} numbers (mm); got {value!r}")
    if len(values) != ndim:
        raise ValueError(f"{name} must have one entry per axis ({ndim}); got {tuple(values)!r}")
    if not all(np.isfinite(v) and v > 0 for v in values):  # also rejects NaN
        raise ValueError(f"{name} must be > 0 (mm) on every axis; got {value!r}")
    return tuple(float(v) for v in values)


def check_threshold(value, name: str = "foreground_threshold") -> Optional[float]:
    """None or a number, as a float."""
    if value is None:
        return None
    if not _is_number(value):
        raise TypeError(f"{name} must be a float or None; got {value!r}")
    return float(value)


def check_transform(transform):
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be callable or None; got {transform!r}")
    return transform
