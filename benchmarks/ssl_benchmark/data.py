"""The benchmark's data: where each image comes from, and which step may see it.

Three roles, three disjoint sources (split by source, never by random slice):

- **pre-training** (no labels): real CT and MR scans gathered by ``scripts/gather_scans.py``
  (pyradiomics chest CT and brain/breast MR, the InVesalius head CT, Colin27, the ITK head T1) plus
  the bundled ICBM152 sample's image;
- **fine-tuning** (labels) and **validation** (labels, for every choice made): two slabs of axial
  slices of the bundled ICBM152 2009a sample (grey / white matter from its probability maps);
- **test**: the SPM ``avg152T1`` template with tissue labels from SPM's ``OldSeg`` grey / white /
  csf priors, the most probable of (background and CSF, grey, white), as the sample's labels are
  made. It is an independent average of 152 subjects (another registration, another scanner
  population); no pre-training or fine-tuning step reads it. SPM is GPL-2: the files are read from
  the ``spm-runtime`` wheel that ``pip download`` fetches into the cache and are never shipped.
"""

from __future__ import annotations

import gzip
import io
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import finetune  # noqa: E402  (slab_indices, CLASSES)

from salign_kernels.data import SAMPLE_IMAGE, SAMPLE_LABEL, SliceStack, find_volumes, load_slices  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SPM_WHEEL = "spm-runtime==25.1.2.post4"
SPM_ARCHIVE = "spm_runtime/_spm/_spm.ctf"  # a plain zip inside the wheel
SPM_ROOT = "fsroot/_spm/cleaned/spm/"
SPM_FILES = {"t1": "canonical/avg152T1.nii", "grey": "toolbox/OldSeg/grey.nii",
             "white": "toolbox/OldSeg/white.nii", "brain": "toolbox/FieldMap/brainmask.nii"}
#: Tissue classes of both labelled templates (0: background and CSF), as the fine-tuning recipe scores them.
CLASSES = finetune.CLASSES


@dataclass(frozen=True)
class Split:
    """Labelled slices of one role. ``images`` ``(n, S, S)`` float32 in [0, 1], ``labels`` ``(n, S, S)``
    int64, ``slices`` their indices in ``source``'s axial stack."""

    images: np.ndarray
    labels: np.ndarray
    slices: Tuple[int, ...]
    source: str


def slab(stack: SliceStack, low: float, high: float) -> np.ndarray:
    """The slices of ``stack`` whose position ``i / (D - 1)`` lies in ``[low, high]``."""
    return finetune.slab_indices(stack, (low, high))


def take(stack: SliceStack, indices: Sequence[int]) -> Split:
    indices = np.asarray(indices, dtype=np.int64)
    return Split(stack.images[indices], stack.labels[indices], tuple(int(i) for i in indices), stack.path)


def fine_tuning_source(size: int) -> SliceStack:
    """The bundled ICBM152 2009a sample, axial slices with labels (the fine-tuning source)."""
    return load_slices(SAMPLE_IMAGE, label_path=SAMPLE_LABEL, size=size, modality="mr")


def fetch_spm(cache: Path) -> Path:
    """The ``spm-runtime`` wheel in ``cache`` (``pip download`` it the first time, 82 MB)."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob("spm_runtime-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                        SPM_WHEEL, "-d", str(cache)], check=True)
        found = sorted(cache.glob("spm_runtime-*.whl"))
    return found[-1]


def brain_box(mask: np.ndarray, margin: int = 1) -> Tuple[slice, ...]:
    """The bounding box of ``mask`` plus ``margin`` voxels, as slices (the sample is cropped alike)."""
    box = []
    for axis, n in enumerate(mask.shape):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(present[0]) - margin, 0), min(int(present[-1]) + 1 + margin, n)))
    return tuple(box)


def build_test_template(cache: Path) -> Tuple[Path, Path]:
    """Write the SPM test template (T1 and labels, cropped to the head) as NIfTI files in ``cache``.

    Labels: the most probable of ``(1 - p_grey - p_white, p_grey, p_white)`` (the priors are stored
    as 0..255 or 0..1; both are read as probabilities). The fine-tuning source is a brain without
    skull, so the T1 is skull-stripped the standard way, with SPM's own brain mask
    (``toolbox/FieldMap/brainmask.nii``, same grid, above 0.5), and cropped to that mask's bounding
    box plus one voxel, as the sample is cropped to its brain: a slice of either shows the anatomy at
    about the same scale.
    """
    import nibabel as nib

    image_path, label_path = cache / "spm_avg152T1.nii.gz", cache / "spm_avg152T1_tissue.nii.gz"
    if image_path.exists() and label_path.exists():
        return image_path, label_path
    with zipfile.ZipFile(fetch_spm(cache)) as wheel:
        archive = zipfile.ZipFile(io.BytesIO(wheel.read(SPM_ARCHIVE)))
    images = {k: nib.Nifti1Image.from_bytes(archive.read(SPM_ROOT + v)) for k, v in SPM_FILES.items()}
    t1 = np.asarray(images["t1"].dataobj, dtype=np.float64)
    grey, white, brain = (np.asarray(images[k].dataobj, dtype=np.float64) for k in ("grey", "white", "brain"))
    grey, white, brain = (p / (255.0 if p.max() > 1.5 else 1.0) for p in (grey, white, brain))
    labels = np.argmax(np.stack([np.clip(1 - grey - white, 0, 1), grey, white]), axis=0)
    inside = brain > 0.5
    t1 = np.where(inside, t1, 0.0)
    box = brain_box(inside)
    corner = np.eye(4)
    corner[:3, 3] = [s.start for s in box]
    affine = images["t1"].affine @ corner
    for array, path, dtype in ((t1[box], image_path, np.float32), (labels[box], label_path, np.uint8)):
        image = nib.Nifti1Image(array.astype(dtype), affine)
        image.header.set_xyzt_units("mm")
        path.write_bytes(gzip.compress(image.to_bytes(), mtime=0))
    return image_path, label_path


def test_template(cache: Path, size: int) -> Tuple[SliceStack, Tuple[float, float, float]]:
    """The SPM avg152T1 test template as axial slices with labels, and the slices' voxel size in mm
    ``(between slices, row, column)`` (each slice is padded to a square and resized to ``size``)."""
    import nibabel as nib

    image, label = build_test_template(cache)
    volume = nib.load(str(image))
    spacing = [float(s) for s in volume.header.get_zooms()[:3]]
    field_of_view = max(n * s for n, s in zip(volume.shape[:2], spacing[:2]))  # axial: axes 0, 1 in-plane
    stack = load_slices(image, label_path=label, size=size, modality="mr")
    return stack, (spacing[2], field_of_view / size, field_of_view / size)


def pretraining_volumes(cache: Path, *, gather: bool = True) -> List[Path]:
    """The unlabelled pre-training volumes: the gathered scans (gathered into ``cache/scans`` the
    first time when ``gather``) and the bundled sample's image. Never the test template."""
    scans = cache / "scans"
    if gather and not find_volumes_or_none(scans):
        subprocess.run([sys.executable, str(REPO / "scripts" / "gather_scans.py"), "--out", str(scans)],
                       check=False)
    return [*find_volumes_or_none(scans), SAMPLE_IMAGE]


def find_volumes_or_none(folder: Path) -> List[Path]:
    return find_volumes(folder) if folder.is_dir() else []
