"""A NIfTI file (or a volume already in memory) -> one normalised volume, optionally resampled to a
voxel size.

The first step of both slice pairs (:func:`~salign_kernels.data.load_slices` cuts the volume into
slices) and sub-volume pairs (:class:`~salign_kernels.data.SubVolumePairDataset` crops it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ._checks import check_spacing
from .intensity import CT_WINDOW, MR_PERCENTILES, check_intensity_options, normalize_intensity
from .io import PathLike, Volume, load_volume


@dataclass(frozen=True)
class NormalizedVolume:
    """One volume, normalised to [0, 1].

    Attributes:
        image: ``(X, Y, Z)`` float32 in [0, 1], RAS+ when loaded with ``canonical=True``.
        spacing: ``(3,)`` voxel size in mm along each array axis.
        path: the file it came from (for a volume given in memory: its name, e.g. ``"volumes[0]"``).
        modality: ``"ct"`` or ``"mr"``, the normalisation that was applied.
    """

    image: np.ndarray
    spacing: Tuple[float, float, float]
    path: str
    modality: str

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.image.shape)


def resample_to_spacing(
    array: np.ndarray, spacing: Sequence[float], target: Sequence[float]
) -> Tuple[np.ndarray, Tuple[float, float, float]]:
    """Resample a volume to about ``target`` mm per voxel, keeping its field of view.

    The new size per axis is ``max(1, round(n * spacing / target))``; the grid then spans the same
    millimetres as before, so the voxel size it returns, ``n * spacing / new_n``, differs from
    ``target`` by the rounding (under half a voxel over the whole axis). Axes that shrink are
    box-averaged first (area interpolation: an antialiasing filter, so thin bright structures are
    not skipped); axes that grow are then interpolated trilinearly. An axis whose size does not
    change is left exactly as it was.

    Shape:
        ``array``: ``(X, Y, Z)`` -> ``(round(X * sx / tx), ...)`` float32.

    Returns:
        ``(resampled array, its voxel size in mm)``.
    """
    old = array.shape
    new = tuple(max(1, round(n * s / t)) for n, s, t in zip(old, spacing, target))
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]  # (1, 1, X, Y, Z)
    shrunk = tuple(min(n, m) for n, m in zip(old, new))
    if shrunk != old:
        x = F.adaptive_avg_pool3d(x, shrunk)
    if new != shrunk:
        x = F.interpolate(x, size=new, mode="trilinear", align_corners=False)
    actual = tuple(float(n * s / m) for n, s, m in zip(old, spacing, new))
    return x[0, 0].numpy(), actual


def normalize_volume(
    volume: Volume,
    *,
    spacing: Optional[Sequence[float]] = None,
    modality: str = "auto",
    ct_window: Tuple[float, float] = CT_WINDOW,
    mr_percentiles: Tuple[float, float] = MR_PERCENTILES,
) -> NormalizedVolume:
    """Normalise a volume's intensities, then optionally resample it: what follows reading a file.

    The intensities are normalised on the volume's own grid (the MR percentiles are those of its
    voxels), then the volume is resampled by :func:`resample_to_spacing` when ``spacing`` is given.

    Args:
        volume: the voxels as stored and their voxel size (:func:`load_volume`'s result).
        spacing: the voxel size in mm to resample to: one number (isotropic) or one per axis;
            None keeps the volume's grid.
        modality: ``"ct"``, ``"mr"`` or ``"auto"`` (see :func:`normalize_intensity`).

    Returns:
        :class:`NormalizedVolume` with ``image`` of shape ``(X, Y, Z)`` (resampled with ``spacing``).

    Raises:
        ValueError: a bad ``spacing``, ``modality``, ``ct_window`` or ``mr_percentiles``.
        TypeError: a ``spacing`` that is not a number or a tuple of 3 numbers.
    """
    target = check_spacing(spacing)
    image, used = normalize_intensity(volume.array, modality, ct_window=ct_window,
                                      mr_percentiles=mr_percentiles)
    voxel = volume.spacing
    if target is not None:
        image, voxel = resample_to_spacing(image, voxel, target)
    return NormalizedVolume(image=image, spacing=voxel, path=volume.path, modality=used)


def load_normalized_volume(
    path: PathLike,
    *,
    spacing: Optional[Sequence[float]] = None,
    modality: str = "auto",
    ct_window: Tuple[float, float] = CT_WINDOW,
    mr_percentiles: Tuple[float, float] = MR_PERCENTILES,
    canonical: bool = True,
) -> NormalizedVolume:
    """Read a NIfTI volume, normalise its intensities and optionally resample it.

    :func:`load_volume`, then :func:`normalize_volume`: the intensities are normalised on the file's
    own grid (the MR percentiles are those of the stored voxels), then the volume is resampled by
    :func:`resample_to_spacing` when ``spacing`` is given.

    Args:
        path: the image, ``.nii`` or ``.nii.gz``.
        spacing: the voxel size in mm to resample to: one number (isotropic) or one per axis;
            None keeps the file's grid.
        modality: ``"ct"``, ``"mr"`` or ``"auto"`` (see :func:`normalize_intensity`).
        canonical: reorient to RAS+ first (see :func:`load_volume`).

    Returns:
        :class:`NormalizedVolume` with ``image`` of shape ``(X, Y, Z)``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: an unreadable or non-3D file; a bad ``spacing``, ``modality``, ``ct_window`` or
            ``mr_percentiles`` (checked before the file is read).
        TypeError: a ``spacing`` that is not a number or a tuple of 3 numbers.
    """
    target = check_spacing(spacing)
    check_intensity_options(modality, ct_window, mr_percentiles)
    return normalize_volume(load_volume(path, canonical=canonical), spacing=target, modality=modality,
                            ct_window=ct_window, mr_percentiles=mr_percentiles)
