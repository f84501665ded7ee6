"""NIfTI volumes (or volumes in memory) -> normalised (optionally resampled) volumes -> random pairs of
nearby sub-volumes."""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._checks import check_int, check_per_axis, check_spacing, check_threshold
from ._pairs import PairDataset
from .intensity import CT_WINDOW, MR_PERCENTILES, check_intensity_options
from .io import PathLike, volume_paths, volumes_from_memory
from .subvolumes import crop_position, offset_room, sample_crop_pair
from .volumes import NormalizedVolume, load_normalized_volume, normalize_volume

PerAxis = Union[int, Tuple[int, int, int]]


def _check_max_offset(value) -> Tuple[int, int, int]:
    if isinstance(value, (tuple, list)):
        offsets = check_per_axis(value, "max_offset", 0)
        if max(offsets) < 1:
            raise ValueError(f"max_offset must be >= 1 on at least one axis; got {tuple(value)!r}")
        return offsets
    return check_per_axis(value, "max_offset", 1)


class SubVolumePairDataset(PairDataset):
    """Random pairs of nearby sub-volumes of NIfTI volumes, for 3D self-supervised alignment.

    Every volume is read once, normalised per volume (CT: HU window; MR: percentile scaling, on the
    file's own grid), resampled to ``spacing`` mm per voxel when one is given (see
    :func:`~salign_kernels.data.volumes.resample_to_spacing`; None keeps the file's grid) and kept
    in memory (``X * Y * Z * 4`` bytes per volume). Axes are those of the RAS+ array: 0 toward
    Right, 1 Anterior, 2 Superior. An item is a pair drawn by the specification's rule: two crops of
    ``crop_size`` whose corners differ by an offset ``d`` uniform per axis in
    ``[-max_offset, max_offset]``, not all zero, both crops inside the volume
    (:func:`~salign_kernels.data.subvolumes.sample_crop_pair`). Volumes already in memory (numpy
    arrays, tensors, MONAI MetaTensors from a MONAI loading pipeline) go through
    :meth:`from_volumes` instead.

    The pair of item ``index`` depends only on ``(seed, epoch, index)``, so it is the same whatever
    DataLoader worker or DDP rank draws it; call :meth:`set_epoch` each epoch, before iterating the
    DataLoader, for fresh pairs (it reaches persistent workers too).
    Volume ``v`` owns ``pairs_per_volume`` consecutive indices (default: ``prod(ceil(n / crop))``,
    the crops it takes to tile it).

    Args:
        data: a folder (every ``*.nii``/``*.nii.gz`` under it), a file, or a sequence of files.
        crop_size: the crops' size in voxels (of the resampled grid): an int, or one per axis.
        max_offset: the largest ``|d|`` per axis in voxels: an int (>= 1), or one per axis (>= 0,
            at least one >= 1; e.g. ``(4, 4, 0)`` keeps both crops on the same axial slices).
        spacing: voxel size in mm to resample to: a number (isotropic), one per axis, or None.
        foreground_threshold: when given, the items carry ``mask_a``/``mask_b``: normalised
            intensity ``> foreground_threshold``.
        modality: ``"auto"``, ``"ct"`` or ``"mr"`` (see
            :func:`~salign_kernels.data.normalize_intensity`).
        pairs_per_volume: items per volume per epoch.
        seed: base seed of the pair sampling (>= 0).
        transform: a callable applied to each item dict (e.g. MONAI dictionary transforms: every
            crop and mask is channel-first, so keys ``crop_a``/``mask_a`` and ``crop_b``/``mask_b``
            take spatial transforms as they are).
        ct_window, mr_percentiles: the normalisation's parameters.

    Item (a dict; the default collate stacks a batch), MONAI's channel-first layout:
        ``crop_a``, ``crop_b``: ``(1, d, h, w)`` float32 in [0, 1], ``(d, h, w) = crop_size``;
        ``pos_a``, ``pos_b``: ``(3,)`` float32 crop centres normalised per axis,
        ``(corner + (crop_size - 1) / 2) / (n - 1)`` (a batch: ``(B, 3)``, what
        ``SALoss(..., pos_dims=3)`` takes);
        ``corner_a``, ``corner_b``: ``(3,)`` int64 corners in voxels; ``volume``: int;
        ``mask_a``, ``mask_b``: ``(1, d, h, w)`` bool, only with ``foreground_threshold`` (a batch is
        ``(B, 1, d, h, w)``: :func:`salign_kernels.feature_mask` brings it onto the features' grid).

    Raises:
        FileNotFoundError: a missing file, or a folder without NIfTI files.
        ValueError: an unreadable or non-3D file; a crop larger than a volume (after resampling), or
            one that leaves no room for an offset; a bad ``crop_size``, ``max_offset``, ``spacing``,
            ``pairs_per_volume``, ``seed``, ``modality``, ``ct_window`` or ``mr_percentiles``.
        TypeError: an option of the wrong type.
        The options are checked before any file is read.

    Example:
        >>> dataset = SubVolumePairDataset("scans/", crop_size=32, max_offset=4, spacing=3.0,
        ...                                foreground_threshold=0.05)
        >>> loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True, num_workers=2)
        >>> batch = next(iter(loader))  # batch["crop_a"]: (4, 1, 32, 32, 32), batch["pos_a"]: (4, 3)
    """

    def __init__(
        self,
        data: Union[PathLike, Sequence[PathLike]],
        *,
        crop_size: PerAxis = 32,
        max_offset: PerAxis = 4,
        spacing: Optional[Union[float, Tuple[float, float, float]]] = None,
        foreground_threshold: Optional[float] = None,
        modality: str = "auto",
        pairs_per_volume: Optional[int] = None,
        seed: int = 0,
        transform: Optional[Callable[[Dict], Dict]] = None,
        ct_window: Tuple[float, float] = CT_WINDOW,
        mr_percentiles: Tuple[float, float] = MR_PERCENTILES,
    ) -> None:
        # Every option is checked before any file is read, so a typo fails at once.
        pairs_per_volume = self._configure(
            crop_size=crop_size, max_offset=max_offset, spacing=spacing,
            foreground_threshold=foreground_threshold, modality=modality, pairs_per_volume=pairs_per_volume,
            seed=seed, transform=transform, ct_window=ct_window, mr_percentiles=mr_percentiles)
        self.paths = volume_paths(data)
        self._keep((load_normalized_volume(path, **self._normalisation) for path in self.paths),
                   pairs_per_volume)

    @classmethod
    def from_volumes(
        cls,
        volumes,
        *,
        voxel_size: Optional[Union[float, Tuple[float, float, float]]] = None,
        crop_size: PerAxis = 32,
        max_offset: PerAxis = 4,
        spacing: Optional[Union[float, Tuple[float, float, float]]] = None,
        foreground_threshold: Optional[float] = None,
        modality: str = "auto",
        pairs_per_volume: Optional[int] = None,
        seed: int = 0,
        transform: Optional[Callable[[Dict], Dict]] = None,
        ct_window: Tuple[float, float] = CT_WINDOW,
        mr_percentiles: Tuple[float, float] = MR_PERCENTILES,
    ) -> "SubVolumePairDataset":
        """Sub-volume pairs of volumes already in memory: e.g. the output of a MONAI loading pipeline.

        The volumes then go the way a file does: intensities normalised per volume on their own
        grid (CT window or MR percentiles), resampled to ``spacing`` when one is given, crops and
        positions as for the constructor; the items are the constructor's.

        - A MONAI ``MetaTensor`` (``LoadImage(ensure_channel_first=True)``, ``Orientation``,
          ``Spacing``, ...) carries its affine: its voxel size is read from it and its voxels are
          reoriented to RAS+ as a file's are, so one loaded from a file gives the pairs the file does.
        - A numpy array or a plain tensor is taken with its axes as they are and ``voxel_size`` as
          its voxel size.

        Shape:
            each volume ``(X, Y, Z)`` or channel-first ``(1, X, Y, Z)``, any real dtype.

        Args:
            volumes: one volume, or a list or tuple of them (volume ``v`` of the items is
                ``volumes[v]``).
            voxel_size: the voxel size in mm of the arrays and plain tensors (what they are stored
                at; ``spacing`` is what to resample to): a number (isotropic) or one per axis.
                Required when there is one; MetaTensors take theirs from their affine.
            crop_size, max_offset, spacing, foreground_threshold, modality, pairs_per_volume, seed,
                transform, ct_window, mr_percentiles: as for the constructor.

        Raises:
            TypeError: ``volumes`` or one of them is not a numpy array, a tensor or a MetaTensor, or
                holds no real numbers (bool, complex); an option of the wrong type.
            ValueError: an empty list; a volume whose rank is not 3 or 4, with more than one channel,
                empty, or too small for the crops; an array or plain tensor without ``voxel_size``;
                a ``voxel_size`` that is not > 0, or given when every volume is a MetaTensor; a bad
                option (checked before the volumes).

        Example:
            >>> from monai.transforms import Compose, LoadImage, Orientation
            >>> load = Compose([LoadImage(ensure_channel_first=True), Orientation("RAS")])
            >>> volumes = [load(p) for p in paths]
            >>> dataset = SubVolumePairDataset.from_volumes(volumes, crop_size=32, spacing=3.0)
        """
        dataset = cls.__new__(cls)
        pairs_per_volume = dataset._configure(
            crop_size=crop_size, max_offset=max_offset, spacing=spacing,
            foreground_threshold=foreground_threshold, modality=modality, pairs_per_volume=pairs_per_volume,
            seed=seed, transform=transform, ct_window=ct_window, mr_percentiles=mr_percentiles)
        raw = volumes_from_memory(volumes, voxel_size)
        dataset.paths = [volume.path for volume in raw]
        dataset._keep((normalize_volume(volume, **dataset._normalisation) for volume in raw),
                      pairs_per_volume)
        return dataset

    def _configure(self, *, crop_size, max_offset, spacing, foreground_threshold, modality, pairs_per_volume,
                   seed, transform, ct_window, mr_percentiles) -> Optional[int]:
        """Check and keep the options (before any volume is read); returns ``pairs_per_volume``."""
        super().__init__(seed, transform)
        self.crop_size = check_per_axis(crop_size, "crop_size", 1)
        self.max_offset = _check_max_offset(max_offset)
        self.spacing = check_spacing(spacing)
        self.foreground_threshold = check_threshold(foreground_threshold)
        check_intensity_options(modality, ct_window, mr_percentiles)
        self._normalisation = {"spacing": self.spacing, "modality": modality, "ct_window": ct_window,
                               "mr_percentiles": mr_percentiles}
        if pairs_per_volume is not None:
            pairs_per_volume = check_int(pairs_per_volume, "pairs_per_volume", 1)
        return pairs_per_volume

    def _keep(self, volumes: Iterable[NormalizedVolume], pairs_per_volume: Optional[int]) -> None:
        """Keep each normalised volume once it is known to hold a pair, and give each volume its items."""
        self.volumes: List[NormalizedVolume] = []
        for volume in volumes:
            self._check_fits(volume)
            self.volumes.append(volume)
        self._own([pairs_per_volume or self._tiles(v.shape) for v in self.volumes])

    def _check_fits(self, volume: NormalizedVolume) -> None:
        """Raise unless both crops of a pair fit in ``volume`` with a non-zero offset."""
        where = f"'{volume.path}' has shape {volume.shape}" + (
            f" on the {self.spacing} mm grid" if self.spacing is not None else ""
        )
        if any(s > n for n, s in zip(volume.shape, self.crop_size)):
            raise ValueError(
                f"crop_size {self.crop_size} is larger than the volume: {where}; give a smaller crop_size "
                "or a finer spacing"
            )
        if max(offset_room(volume.shape, self.crop_size, self.max_offset)) < 1:
            raise ValueError(
                f"crop_size {self.crop_size} with max_offset {self.max_offset} leaves no room for an offset: "
                f"{where}; a pair needs the crop smaller than the volume on an axis where max_offset >= 1"
            )

    def _tiles(self, shape: Sequence[int]) -> int:
        return math.prod(math.ceil(n / s) for n, s in zip(shape, self.crop_size))

    def crop(self, volume: int, corner: Sequence[int]) -> np.ndarray:
        """The ``crop_size`` crop of volume ``volume`` at ``corner``: a ``(d, h, w)`` float32 view."""
        return self.volumes[volume].image[tuple(slice(c, c + s) for c, s in zip(corner, self.crop_size))]

    def position(self, volume: int, corner: Sequence[int]) -> np.ndarray:
        """The normalised centre ``(3,)`` of the crop at ``corner`` (see :func:`crop_position`)."""
        return crop_position(corner, self.crop_size, self.volumes[volume].shape)

    def _draw(self, v: int, rng: np.random.Generator) -> Dict:
        corner_a, corner_b = sample_crop_pair(self.volumes[v].shape, self.crop_size, self.max_offset, rng)
        crop_a, crop_b = self.crop(v, corner_a), self.crop(v, corner_b)
        item = {
            "crop_a": torch.from_numpy(crop_a[None].copy()),
            "crop_b": torch.from_numpy(crop_b[None].copy()),
            "pos_a": torch.from_numpy(self.position(v, corner_a)),
            "pos_b": torch.from_numpy(self.position(v, corner_b)),
            "corner_a": torch.tensor(corner_a, dtype=torch.int64),
            "corner_b": torch.tensor(corner_b, dtype=torch.int64),
            "volume": v,
        }
        if self.foreground_threshold is not None:
            # Channel-first like the crops, so that MONAI's spatial transforms treat both alike.
            item["mask_a"] = torch.from_numpy(crop_a[None] > self.foreground_threshold)
            item["mask_b"] = torch.from_numpy(crop_b[None] > self.foreground_threshold)
        return item
