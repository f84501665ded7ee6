"""Reading NIfTI volumes: one file -> a 3D array with its voxel spacing; a folder or a list -> its files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import numpy as np

from ._deps import require

PathLike = Union[str, os.PathLike]

#: The file names :func:`find_volumes` picks up.
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class Volume:
    """A 3D scan in memory.

    Attributes:
        array: ``(X, Y, Z)`` float32 voxel values as stored (HU for CT, arbitrary units for MR), after
            the file's scaling (``scl_slope``/``scl_inter``) and, with ``canonical=True``, reoriented
            so that axis 0, 1, 2 run toward Right, Anterior, Superior (RAS+).
        spacing: ``(3,)`` voxel size in mm along each array axis.
        path: the file it came from.
    """

    array: np.ndarray
    spacing: Tuple[float, float, float]
    path: str


def _is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def load_volume(path: PathLike, *, canonical: bool = True, dtype=np.float32) -> Volume:
    """Read a 3D NIfTI file (``.nii`` or ``.nii.gz``) with nibabel.

    Singleton dimensions past the third (``(X, Y, Z, 1)``) are dropped. With ``canonical=True`` the
    volume is reoriented to the closest RAS+ orientation, so ``axis=2`` is axial for every scanner's
    files (a permutation and flips of the stored voxels: nothing is interpolated).

    Args:
        path: the file.
        canonical: reorient to RAS+ (``nibabel.as_closest_canonical``).
        dtype: the array's dtype (``np.float32``, or an integer type for label maps).

    Returns:
        :class:`Volume` with ``array`` of shape ``(X, Y, Z)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be read as NIfTI (corrupt, truncated, another format), or it is
            not 3D (a 2D image, or a 4D series with more than one frame).
        ImportError: nibabel is not installed.
    """
    nib = require("nibabel")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: '{path}'")
    try:
        image = nib.load(str(path))
        if canonical:
            image = nib.as_closest_canonical(image)
        # Reading the voxels is where a truncated .gz fails, so it sits inside the try too.
        array = np.asarray(image.dataobj, dtype=dtype)
        zooms = image.header.get_zooms()
    except Exception as exc:  # nibabel raises ImageFileError, gzip EOFError/OSError, zlib.error, ...
        raise ValueError(f"could not read '{path}' as a NIfTI volume: {type(exc).__name__}: {exc}") from exc
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise ValueError(
            f"'{path}' has shape {tuple(array.shape)}: a 3D volume (X, Y, Z) is needed to take slice pairs "
            + ("(this is a 2D image)" if array.ndim < 3 else "(a 4D series: save one frame as its own file)")
        )
    spacing = tuple(float(z) for z in zooms[:3])
    return Volume(array=array, spacing=spacing, path=str(path))


def find_volumes(folder: PathLike) -> List[Path]:
    """Every NIfTI file (``*.nii``, ``*.nii.gz``) under ``folder``, recursively, sorted by path.

    Raises:
        FileNotFoundError: ``folder`` does not exist, is not a folder, or holds no NIfTI file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder not found: '{folder}'")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and _is_nifti(p))
    if not files:
        raise FileNotFoundError(f"no NIfTI files ({', '.join('*' + s for s in NIFTI_SUFFIXES)}) in '{folder}'")
    return files


def volume_paths(data: Union[PathLike, Sequence[PathLike]]) -> List[Path]:
    """The files a dataset reads: a folder (searched recursively), one file, or a sequence of files.

    A missing file is not reported here but by :func:`load_volume`, which names it.

    Raises:
        FileNotFoundError: a folder without NIfTI files.
        TypeError: ``data`` is none of these.
        ValueError: an empty sequence.
    """
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        return find_volumes(path) if path.is_dir() else [path]
    try:
        paths = [Path(p) for p in data]
    except TypeError:
        raise TypeError(f"data must be a folder, a file or a sequence of files; got {data!r}") from None
    if not paths:
        raise ValueError("data is an empty sequence: give at least one NIfTI file")
    return paths
