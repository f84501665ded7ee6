"""NIfTI volumes (or volumes in memory) -> normalised square slices -> random pairs of nearby slices, as
MONAI-style dicts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._checks import check_int, check_threshold
from ._pairs import PairDataset
from .intensity import CT_WINDOW, MR_PERCENTILES, check_intensity_options
from .io import PathLike, load_volume, volume_paths, volumes_from_memory
from .slices import check_axis, sample_pair, to_slices
from .volumes import NormalizedVolume, load_normalized_volume, normalize_volume


@dataclass(frozen=True)
class SliceStack:
    """One volume cut into normalised square slices (what the datasets keep in memory).

    Attributes:
        images: ``(D, size, size)`` float32 in [0, 1], slice ``i`` at position ``i / (D - 1)``.
        labels: ``(D, size, size)`` int64 label map on the same grid, or None.
        path: the image file (for a volume given in memory: its name, e.g. ``"volumes[0]"``).
        modality: ``"ct"`` or ``"mr"``, the normalisation that was applied.
    """

    images: np.ndarray
    labels: Optional[np.ndarray]
    path: str
    modality: str

    @property
    def num_slices(self) -> int:
        return self.images.shape[0]

    def position(self, index: int) -> float:
        """``index / (D - 1)``: the slice's relative position in the volume (0 for a single slice)."""
        return index / max(self.num_slices - 1, 1)


def _slice_stack(volume: NormalizedVolume, axis: int, size: int) -> SliceStack:
    """Cut a normalised volume into its ``(D, size, size)`` slices along ``axis``."""
    images = to_slices(volume.image, axis, size, volume.spacing)
    return SliceStack(images=images, labels=None, path=volume.path, modality=volume.modality)


def load_slices(
    path: PathLike,
    *,
    axis: int = 2,
    size: int = 96,
    modality: str = "auto",
    label_path: Optional[PathLike] = None,
    ct_window: Tuple[float, float] = CT_WINDOW,
    mr_percentiles: Tuple[float, float] = MR_PERCENTILES,
    canonical: bool = True,
) -> SliceStack:
    """Read a NIfTI volume (and optionally its label map), normalise it and cut it into slices.

    Args:
        path: the image, ``.nii`` or ``.nii.gz``.
        axis: the slicing axis of the (RAS+ when ``canonical``) volume: 0 sagittal, 1 coronal,
            2 axial.
        size: the side of the square slices.
        modality: ``"ct"`` (HU window ``ct_window``), ``"mr"`` (percentiles ``mr_percentiles``) or
            ``"auto"`` (CT when the volume holds air at about -1000).
        label_path: an integer label map on the image's voxel grid.
        canonical: reorient to RAS+ first, so ``axis`` means the same for every file.

    Returns:
        :class:`SliceStack` with ``images`` (and ``labels``) of shape ``(D, size, size)``.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: an unreadable or non-3D file, ``axis`` out of range, a label map whose shape
            differs from the image's, a bad ``size`` or ``modality``.
    """
    axis = check_axis(axis)
    size = check_int(size, "size", 1)
    volume = load_normalized_volume(path, modality=modality, ct_window=ct_window,
                                    mr_percentiles=mr_percentiles, canonical=canonical)
    stack = _slice_stack(volume, axis, size)
    if label_path is not None:
        label = load_volume(label_path, canonical=canonical, dtype=np.float32)
        if label.array.shape != volume.shape:
            raise ValueError(
                f"label_path '{label_path}' has shape {label.array.shape}, the image '{path}' has "
                f"{volume.shape}: they must share one voxel grid"
            )
        labels = to_slices(label.array, axis, size, volume.spacing, labels=True)
        stack = SliceStack(images=stack.images, labels=labels, path=stack.path, modality=stack.modality)
    return stack


class SlicePairDataset(PairDataset):
    """Random pairs of nearby slices of NIfTI volumes, for self-supervised alignment pre-training.

    Every volume is read once, normalised per volume (CT: HU window; MR: percentile scaling), cut
    along ``axis`` into slices resampled to ``size x size`` and kept in memory
    (``D * size**2 * 4`` bytes per volume). An item is a pair drawn by the specification's rule:
    ``i`` uniform over the volume's slices, ``j = i + d`` with ``d`` uniform in
    ``[-max_offset, max_offset] \\ {0}``, kept inside the volume. Volumes already in memory (numpy
    arrays, tensors, MONAI MetaTensors from a MONAI loading pipeline) go through
    :meth:`from_volumes` instead.

    The pair of item ``index`` depends only on ``(seed, epoch, index)``, so it is the same whatever
    DataLoader worker or DDP rank draws it; call :meth:`set_epoch` each epoch, before iterating the
    DataLoader, for fresh pairs (it reaches persistent workers too). Volume ``v`` owns
    ``pairs_per_volume`` consecutive indices (default: its number of slices).

    Args:
        data: a folder (every ``*.nii``/``*.nii.gz`` under it), a file, or a sequence of files.
        axis: slicing axis of the RAS+ volume: 0 sagittal, 1 coronal, 2 axial.
        size: side of the square slices.
        max_offset: the largest slice distance ``|j - i|`` (>= 1).
        foreground_threshold: when given, the items carry ``mask_a``/``mask_b``:
            normalised intensity ``> foreground_threshold``.
        modality: ``"auto"``, ``"ct"`` or ``"mr"`` (see :func:`load_slices`).
        slab: ``(low, high)`` in [0, 1]: draw both slices among those whose position
            ``i / (D - 1)`` lies in ``[low, high]`` (to hold out a distant slab).
        pairs_per_volume: items per volume per epoch.
        seed: base seed of the pair sampling (>= 0).
        transform: a callable applied to each item dict (e.g. MONAI dictionary transforms: every
            image and mask is channel-first, so keys ``slice_a``/``mask_a`` and ``slice_b``/``mask_b``
            take spatial transforms as they are).

    Item (a dict; the default collate stacks a batch), MONAI's channel-first layout:
        ``slice_a``, ``slice_b``: ``(1, size, size)`` float32 in [0, 1];
        ``pos_a``, ``pos_b``: float32 scalars ``i / (D - 1)``, ``j / (D - 1)``;
        ``index_a``, ``index_b``, ``volume``: ints;
        ``mask_a``, ``mask_b``: ``(1, size, size)`` bool, only with ``foreground_threshold``
        (a batch is ``(B, 1, size, size)``: :func:`salign_kernels.feature_mask` brings it onto the
        features' grid, the ``(B, h, w)`` the losses take).

    Raises:
        FileNotFoundError: a missing file, or a folder without NIfTI files.
        ValueError: an unreadable or non-3D file, ``axis`` out of range, a volume with fewer than two
            slices (in ``slab``), bad ``size``, ``max_offset``, ``slab``, ``seed``, ``modality``,
            ``ct_window`` or ``mr_percentiles`` (the options are checked before any file is read).
        TypeError: an option of the wrong type.

    Example:
        >>> dataset = SlicePairDataset("scans/", size=96, foreground_threshold=0.05)
        >>> loader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True, num_workers=2)
        >>> batch = next(iter(loader))  # batch["slice_a"]: (16, 1, 96, 96), batch["pos_a"]: (16,)
    """

    def __init__(
        self,
        data: Union[PathLike, Sequence[PathLike]],
        *,
        axis: int = 2,
        size: int = 96,
        max_offset: int = 3,
        foreground_threshold: Optional[float] = None,
        modality: str = "auto",
        slab: Optional[Tuple[float, float]] = None,
        pairs_per_volume: Optional[int] = None,
        seed: int = 0,
        transform: Optional[Callable[[Dict], Dict]] = None,
        ct_window: Tuple[float, float] = CT_WINDOW,
        mr_percentiles: Tuple[float, float] = MR_PERCENTILES,
    ) -> None:
        # Every option is checked before any file is read, so a typo fails at once.
        pairs_per_volume = self._configure(
            axis=axis, size=size, max_offset=max_offset, foreground_threshold=foreground_threshold,
            modality=modality, slab=slab, pairs_per_volume=pairs_per_volume, seed=seed, transform=transform,
            ct_window=ct_window, mr_percentiles=mr_percentiles)
        self.paths = volume_paths(data)
        # One file at a time: only its slices stay in memory, not the full-resolution volume.
        self._keep((load_normalized_volume(path, **self._normalisation) for path in self.paths),
                   pairs_per_volume)

    @classmethod
    def from_volumes(
        cls,
        volumes,
        *,
        voxel_size: Optional[Union[float, Tuple[float, float, float]]] = None,
        axis: int = 2,
        size: int = 96,
        max_offset: int = 3,
        foreground_threshold: Optional[float] = None,
        modality: str = "auto",
        slab: Optional[Tuple[float, float]] = None,
        pairs_per_volume: Optional[int] = None,
        seed: int = 0,
        transform: Optional[Callable[[Dict], Dict]] = None,
        ct_window: Tuple[float, float] = CT_WINDOW,
        mr_percentiles: Tuple[float, float] = MR_PERCENTILES,
    ) -> "SlicePairDataset":
        """Slice pairs of volumes already in memory: e.g. the output of a MONAI loading pipeline.

        The volumes then go the way a file does: intensities normalised per volume as they are
        (CT window or MR percentiles, see :func:`~salign_kernels.data.normalize_intensity`), slices
        along ``axis`` padded to a square field of view in mm and resized to ``size x size``,
        positions ``i / (D - 1)``; the items are those of the constructor.

        - A MONAI ``MetaTensor`` (``LoadImage(ensure_channel_first=True)``, ``Orientation``,
          ``Spacing``, ...) carries its affine: its voxel size is read from it and its voxels are
          reoriented to RAS+ as a file's are, so one loaded from a file gives the pairs the file does.
        - A numpy array or a plain tensor is taken with its axes as they are (RAS+ for ``axis`` to
          mean sagittal / coronal / axial) and ``voxel_size`` as its voxel size.

        Shape:
            each volume ``(X, Y, Z)`` or channel-first ``(1, X, Y, Z)``, any real dtype.

        Args:
            volumes: one volume, or a list or tuple of them (volume ``v`` of the items is
                ``volumes[v]``).
            voxel_size: the voxel size in mm of the arrays and plain tensors: a number (isotropic) or
                one per axis. Required when there is one; MetaTensors take theirs from their affine.
            axis, size, max_offset, foreground_threshold, modality, slab, pairs_per_volume, seed,
                transform, ct_window, mr_percentiles: as for the constructor.

        Raises:
            TypeError: ``volumes`` or one of them is not a numpy array, a tensor or a MetaTensor, or
                holds no real numbers (bool, complex); an option of the wrong type.
            ValueError: an empty list; a volume whose rank is not 3 or 4, with more than one channel,
                empty, or with fewer than two slices (in ``slab``); an array or plain tensor without
                ``voxel_size``; a ``voxel_size`` that is not > 0, or given when every volume is a
                MetaTensor; a bad option (checked before the volumes).

        Example:
            >>> from monai.transforms import Compose, LoadImage, Orientation, Spacing
            >>> load = Compose([LoadImage(ensure_channel_first=True), Orientation("RAS"), Spacing(2.0)])
            >>> dataset = SlicePairDataset.from_volumes([load(p) for p in paths], size=96)
            >>> dataset = SlicePairDataset.from_volumes(np.random.rand(64, 64, 40), voxel_size=(1, 1, 3))
        """
        dataset = cls.__new__(cls)
        pairs_per_volume = dataset._configure(
            axis=axis, size=size, max_offset=max_offset, foreground_threshold=foreground_threshold,
            modality=modality, slab=slab, pairs_per_volume=pairs_per_volume, seed=seed, transform=transform,
            ct_window=ct_window, mr_percentiles=mr_percentiles)
        raw = volumes_from_memory(volumes, voxel_size)
        dataset.paths = [volume.path for volume in raw]
        dataset._keep((normalize_volume(volume, **dataset._normalisation) for volume in raw),
                      pairs_per_volume)
        return dataset

    def _configure(self, *, axis, size, max_offset, foreground_threshold, modality, slab, pairs_per_volume,
                   seed, transform, ct_window, mr_percentiles) -> Optional[int]:
        """Check and keep the options (before any volume is read); returns ``pairs_per_volume``."""
        super().__init__(seed, transform)
        self.axis = check_axis(axis)
        self.size = check_int(size, "size", 1)
        self.max_offset = check_int(max_offset, "max_offset", 1)
        if pairs_per_volume is not None:
            pairs_per_volume = check_int(pairs_per_volume, "pairs_per_volume", 1)
        self.foreground_threshold = check_threshold(foreground_threshold)
        check_intensity_options(modality, ct_window, mr_percentiles)
        self._normalisation = {"modality": modality, "ct_window": ct_window, "mr_percentiles": mr_percentiles}
        self.slab = None if slab is None else self._check_slab(slab)
        return pairs_per_volume

    def _keep(self, volumes: Iterable[NormalizedVolume], pairs_per_volume: Optional[int]) -> None:
        """Cut each normalised volume into slices, keep them, and give each volume its items."""
        self.volumes: List[SliceStack] = []
        self.ranges: List[Tuple[int, int]] = []  # allowed (first, last) slice per volume
        for volume in volumes:
            stack = _slice_stack(volume, self.axis, self.size)
            self.ranges.append(self._slice_range(stack, volume.path))
            self.volumes.append(stack)
        self._own([pairs_per_volume or (last - first + 1) for first, last in self.ranges])

    @staticmethod
    def _check_slab(slab) -> Tuple[float, float]:
        try:
            low, high = (float(v) for v in slab)
        except (TypeError, ValueError):
            raise TypeError(f"slab must be a pair (low, high) of positions in [0, 1]; got {slab!r}") from None
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"slab must satisfy 0 <= low < high <= 1; got {slab!r}")
        return low, high

    def _slice_range(self, stack: SliceStack, path) -> Tuple[int, int]:
        """The (first, last) slices pairs may use; raises when fewer than two are left."""
        D = stack.num_slices
        if D < 2:
            raise ValueError(
                f"'{path}' has {D} slice along axis={self.axis}: a slice pair needs at least 2"
            )
        if self.slab is None:
            return 0, D - 1
        low, high = self.slab
        # Positions i / (D - 1) in [low, high]; the small tolerance keeps the end slices exact.
        first, last = int(np.ceil(low * (D - 1) - 1e-9)), int(np.floor(high * (D - 1) + 1e-9))
        if last - first + 1 < 2:
            raise ValueError(
                f"slab={self.slab} keeps {max(last - first + 1, 0)} of the {D} slices of '{path}' "
                f"along axis={self.axis}: a slice pair needs at least 2"
            )
        return first, last

    def _draw(self, v: int, rng: np.random.Generator) -> Dict:
        stack = self.volumes[v]
        i, j = sample_pair(stack.num_slices, self.max_offset, rng, self.ranges[v])
        item = {
            "slice_a": torch.from_numpy(stack.images[i][None].copy()),
            "slice_b": torch.from_numpy(stack.images[j][None].copy()),
            "pos_a": torch.tensor(stack.position(i), dtype=torch.float32),
            "pos_b": torch.tensor(stack.position(j), dtype=torch.float32),
            "index_a": i,
            "index_b": j,
            "volume": v,
        }
        if self.foreground_threshold is not None:
            # Channel-first like the slices, so that MONAI's spatial transforms treat both alike.
            item["mask_a"] = torch.from_numpy(stack.images[i][None] > self.foreground_threshold)
            item["mask_b"] = torch.from_numpy(stack.images[j][None] > self.foreground_threshold)
        return item
