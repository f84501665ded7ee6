"""NIfTI volumes -> normalised slices or sub-volumes -> pairs of nearby ones for SAL pre-training.

Needs the optional packages of the ``data`` extra (``pip install "salign-kernels[data]"``): nibabel
reads the files. This package imports without them; the first function that reads a file says what
is missing. Volumes already in memory (numpy arrays, tensors, MONAI MetaTensors) make pairs through
``SlicePairDataset.from_volumes`` and ``SubVolumePairDataset.from_volumes``. Every image and mask of
an item is channel-first, as MONAI's dictionary transforms expect.

Example:
    >>> from salign_kernels.data import SlicePairDataset, SubVolumePairDataset, SAMPLE_IMAGE
    >>> dataset = SlicePairDataset(SAMPLE_IMAGE, size=96, max_offset=3, foreground_threshold=0.05)
    >>> item = dataset[0]  # slice_a, slice_b (1, 96, 96); pos_a, pos_b; mask_a, mask_b (1, 96, 96)
    >>> volumes = SubVolumePairDataset(SAMPLE_IMAGE, crop_size=32, spacing=3.0, foreground_threshold=0.05)
    >>> item = volumes[0]  # crop_a, crop_b (1, 32, 32, 32); pos_a, pos_b (3,); mask_a, mask_b (1, 32, 32, 32)
"""

from .dataset import SlicePairDataset, SliceStack, load_slices
from .intensity import CT_WINDOW, MR_PERCENTILES, detect_modality, normalize_intensity
from .io import Volume, find_volumes, load_volume
from .sample import SAMPLE_CLASSES, SAMPLE_IMAGE, SAMPLE_LABEL, sample_paths
from .slices import sample_pair, to_slices
from .subvolume_dataset import SubVolumePairDataset
from .subvolumes import crop_position, sample_crop_pair
from .volumes import NormalizedVolume, load_normalized_volume, normalize_volume, resample_to_spacing

__all__ = [
    "SlicePairDataset",
    "SliceStack",
    "load_slices",
    "SubVolumePairDataset",
    "NormalizedVolume",
    "load_normalized_volume",
    "normalize_volume",
    "resample_to_spacing",
    "sample_crop_pair",
    "crop_position",
    "load_volume",
    "find_volumes",
    "Volume",
    "normalize_intensity",
    "detect_modality",
    "CT_WINDOW",
    "MR_PERCENTILES",
    "sample_pair",
    "to_slices",
    "SAMPLE_IMAGE",
    "SAMPLE_LABEL",
    "SAMPLE_CLASSES",
    "sample_paths",
]
