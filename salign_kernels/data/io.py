"""Reading volumes: one NIfTI file, or one volume already in memory -> a 3D array with its voxel spacing;
a folder or a list -> its files."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._checks import check_spacing
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


# ------------------------------------------------------------------------------------------- in memory
def _metatensor_class():
    """MONAI's MetaTensor class when MONAI is imported (a MetaTensor cannot exist otherwise), else None."""
    module = sys.modules.get("monai.data.meta_tensor")
    return getattr(module, "MetaTensor", None)


def _is_metatensor(data) -> bool:
    cls = _metatensor_class()
    return cls is not None and isinstance(data, cls)


def _file_hint(data) -> str:
    """What to say to someone who passes a path where a volume in memory belongs."""
    if isinstance(data, (str, os.PathLike)):
        return " (for files, pass them to the dataset's constructor)"
    return ""


def _numeric_array(data, name: str) -> np.ndarray:
    """``data`` (a numpy array or a tensor, MetaTensor included) as a float32 numpy array."""
    if isinstance(data, torch.Tensor):
        dtype = data.dtype
        numeric = dtype.is_floating_point or not (dtype.is_complex or dtype == torch.bool)
    elif isinstance(data, np.ndarray):
        dtype = data.dtype
        numeric = np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)
    else:
        raise TypeError(
            f"{name} must be a numpy array, a torch tensor or a MONAI MetaTensor; got "
            f"{type(data).__name__}{_file_hint(data)}"
        )
    if not numeric:
        raise TypeError(f"{name} must hold real numbers (an integer or floating dtype); got dtype {dtype}")
    if isinstance(data, torch.Tensor):
        if _is_metatensor(data):
            data = data.as_tensor()  # the plain tensor: MetaTensor operations would track metadata
        # Through float32 in torch: numpy has no bfloat16.
        return data.detach().to(device="cpu", dtype=torch.float32).numpy()
    return np.asarray(data, dtype=np.float32)


def _spatial(array: np.ndarray, name: str) -> np.ndarray:
    """The ``(X, Y, Z)`` voxels of a ``(X, Y, Z)`` or channel-first ``(1, X, Y, Z)`` array."""
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise ValueError(
                f"{name} has shape {tuple(array.shape)}: a 4D volume must be channel-first (1, X, Y, Z) "
                f"with one channel; got {array.shape[0]} channels"
            )
        array = array[0]
    if array.ndim != 3:
        raise ValueError(
            f"{name} has shape {tuple(array.shape)}: a volume must be (X, Y, Z) or channel-first (1, X, Y, Z)"
        )
    if 0 in array.shape:
        raise ValueError(f"{name} has shape {tuple(array.shape)}: a volume must not be empty")
    return array


def _affine_voxel_size(affine: np.ndarray, name: str) -> Tuple[float, float, float]:
    """Voxel size in mm along each array axis: the lengths of the affine's first three columns."""
    lengths = tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    return check_spacing(lengths, f"the voxel size of {name} (its affine)")


def as_volume(data, *, name: str, voxel_size: Optional[Tuple[float, float, float]] = None) -> Volume:
    """A volume already in memory as the :class:`Volume` that :func:`load_volume` gives for a file.

    - A MONAI ``MetaTensor`` (e.g. from ``LoadImage(ensure_channel_first=True)``, after any
      ``Orientation`` or ``Spacing``) carries its affine: the voxel size is read from it, and the
      voxels are reoriented to the closest RAS+ orientation as :func:`load_volume` does for a file
      (nibabel's ``io_orientation``: a permutation and flips, nothing is interpolated).
    - A numpy array or a plain tensor carries neither: its axes are taken as they are (RAS+ for
      ``axis`` to mean what it means for files) and ``voxel_size`` is its voxel size.

    Shape:
        ``data``: ``(X, Y, Z)`` or channel-first ``(1, X, Y, Z)``; the :class:`Volume`'s ``array`` is
        ``(X, Y, Z)`` float32 (``(X', Y', Z')``, the RAS+ axes, for a MetaTensor).

    Args:
        data: the volume.
        name: how messages (and the :class:`Volume`'s ``path``) name it, e.g. ``"volumes[2]"``.
        voxel_size: ``(3,)`` mm, checked by the caller; required for arrays and plain tensors.

    Raises:
        TypeError: ``data`` is not an array or a tensor, or holds no real numbers (bool, complex).
        ValueError: a rank other than 3 or 4, a channel-first volume with more than one channel, an
            empty volume, an array or plain tensor without ``voxel_size``, or a MetaTensor whose
            affine is not 4 x 4 or gives a voxel size that is not > 0.
    """
    array = _spatial(_numeric_array(data, name), name)
    if not _is_metatensor(data):
        if voxel_size is None:
            raise ValueError(
                f"voxel_size is needed for {name}: numpy arrays and plain tensors carry no voxel size "
                "(give e.g. voxel_size=1.0 for 1 mm voxels, or pass a MONAI MetaTensor)"
            )
        return Volume(array=array, spacing=tuple(voxel_size), path=name)
    affine = np.asarray(data.affine.detach().cpu(), dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(
            f"{name} is a MetaTensor whose affine has shape {affine.shape}; a 3D volume needs 4 x 4"
        )
    spacing = _affine_voxel_size(affine, name)
    orientations = require("nibabel").orientations
    ornt = orientations.io_orientation(affine)  # row i: the RAS axis input axis i runs along, and its sign
    array = orientations.apply_orientation(array, ornt)
    # Input axis i becomes output axis ornt[i, 0]; its voxels keep their size.
    spacing = tuple(spacing[int(np.flatnonzero(ornt[:, 0] == k)[0])] for k in range(3))
    filename = data.meta.get("filename_or_obj") if hasattr(data, "meta") else None
    return Volume(array=array, spacing=spacing, path=f"{name} ({filename})" if filename else name)


def volumes_from_memory(volumes, voxel_size=None) -> List[Volume]:
    """The :class:`Volume` of each volume in ``volumes`` (one volume, or a list or tuple of them).

    Each goes through :func:`as_volume`; the first is named ``volumes`` when ``volumes`` is a single
    volume, else ``volumes[k]``.

    Args:
        volumes: a numpy array, a tensor or a MetaTensor, or a list or tuple of them.
        voxel_size: the voxel size in mm of the arrays and plain tensors (a number for every axis, or
            three); MetaTensors take theirs from their affine.

    Raises:
        TypeError: ``volumes`` or one of them is not an array or a tensor; a bad ``voxel_size`` type.
        ValueError: an empty list; a bad volume (see :func:`as_volume`); a ``voxel_size`` that is
            not > 0, or one given when every volume is a MetaTensor (it would be ignored).
    """
    voxel_size = check_spacing(voxel_size, "voxel_size")
    if isinstance(volumes, (np.ndarray, torch.Tensor)):
        named = [("volumes", volumes)]
    elif isinstance(volumes, (list, tuple)):
        if not volumes:
            raise ValueError("volumes is an empty sequence: give at least one volume")
        named = [(f"volumes[{k}]", v) for k, v in enumerate(volumes)]
    else:
        raise TypeError(
            "volumes must be a numpy array, a torch tensor or a MONAI MetaTensor, or a list of them; "
            f"got {type(volumes).__name__}{_file_hint(volumes)}"
        )
    if voxel_size is not None and all(_is_metatensor(v) for _, v in named):
        raise ValueError(
            f"voxel_size={voxel_size} is given, but every volume is a MetaTensor, whose affine gives its "
            "voxel size: leave voxel_size out (or resample the MetaTensors with MONAI's Spacing)"
        )
    return [as_volume(v, name=name, voxel_size=voxel_size) for name, v in named]
