"""Per-volume intensity normalisation to [0, 1]: a HU window for CT, percentile scaling for MR.

The formulas are those of MONAI's ``ScaleIntensityRange`` (CT) and ``ScaleIntensityRangePercentiles``
(MR) with ``b_min=0, b_max=1, clip=True``, written in numpy so the data module needs only nibabel.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

MODALITIES = ("auto", "ct", "mr")

#: Default CT window in HU: air (-1000) to dense bone (+1000); wide, so lung, soft tissue and bone
#: all keep their contrast.
CT_WINDOW = (-1000.0, 1000.0)

#: Default MR percentiles: robust to the few very bright voxels (vessels, fat) MR volumes have.
MR_PERCENTILES = (0.5, 99.5)

# A CT volume holds air at about -1000 HU; no MR volume has values this far below zero.
_CT_AIR_BELOW = -500.0


def detect_modality(array: np.ndarray) -> str:
    """``"ct"`` when the volume's lowest 0.1 % lies below -500 (air in HU), else ``"mr"``."""
    return "ct" if float(np.percentile(array, 0.1)) < _CT_AIR_BELOW else "mr"


def _check_range(value, name: str) -> Tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair of numbers (low, high); got {value!r}") from None
    if not low < high:
        raise ValueError(f"{name} must have low < high; got {value!r}")
    return low, high


def check_intensity_options(
    modality: str, ct_window: Tuple[float, float], mr_percentiles: Tuple[float, float]
) -> Tuple[Tuple[float, float], Tuple[float, float]]:
    """The checks of :func:`normalize_intensity`'s options, for callers that check before reading.

    Returns:
        ``(ct_window, mr_percentiles)`` as pairs of floats.

    Raises:
        ValueError: unknown ``modality``; a window or percentile pair that is not increasing, or
            percentiles outside [0, 100].
        TypeError: a window or percentile pair that is not two numbers.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}; got {modality!r}")
    window = _check_range(ct_window, "ct_window")
    percentiles = _check_range(mr_percentiles, "mr_percentiles")
    if not 0.0 <= percentiles[0] < percentiles[1] <= 100.0:
        raise ValueError(f"mr_percentiles must lie in [0, 100]; got {mr_percentiles!r}")
    return window, percentiles


def normalize_intensity(
    array: np.ndarray,
    modality: str = "auto",
    *,
    ct_window: Tuple[float, float] = CT_WINDOW,
    mr_percentiles: Tuple[float, float] = MR_PERCENTILES,
) -> Tuple[np.ndarray, str]:
    """Scale one volume's intensities to [0, 1].

    - CT: ``clip((x - lo) / (hi - lo), 0, 1)`` with ``(lo, hi) = ct_window`` in HU.
    - MR: the same with ``lo, hi`` = the ``mr_percentiles`` of this volume's voxels.
      A constant volume becomes all zeros.

    Args:
        array: a volume of any shape.
        modality: ``"ct"``, ``"mr"`` or ``"auto"`` (:func:`detect_modality`).

    Returns:
        ``(normalised float32 array of the same shape, the modality used)``.

    Raises:
        ValueError: unknown ``modality``; a window or percentile pair that is not increasing.
    """
    (low, high), (p_low, p_high) = check_intensity_options(modality, ct_window, mr_percentiles)
    if modality == "auto":
        modality = detect_modality(array)
    if modality == "mr":
        low, high = (float(v) for v in np.percentile(array, (p_low, p_high)))
    if high <= low:  # a constant volume: nothing to scale
        return np.zeros(array.shape, dtype=np.float32), modality
    scaled = (array.astype(np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(scaled, 0.0, 1.0, out=scaled), modality
