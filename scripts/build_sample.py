"""Rebuild the bundled sample (salign_kernels/data/sample/) from the ICBM152 2009a files in nilearn's wheel.

    python scripts/build_sample.py [--wheel nilearn-0.14.1-py3-none-any.whl] [--out DIR]

Without ``--wheel`` the wheel is fetched with ``pip download --no-deps nilearn==0.14.1`` (nilearn itself
is never imported: that would need scikit-learn). From the T1 template and its grey- and white-matter
probability maps (197 x 233 x 189, 1 mm) it writes

- ``icbm152_2009a_t1_2mm.nii.gz``: the T1 template cropped to the brain's bounding box and averaged over
  2 x 2 x 2 blocks (2 mm isotropic, uint8, RAS+);
- ``icbm152_2009a_tissue_2mm.nii.gz``: labels 0 background (and CSF), 1 grey matter, 2 white matter:
  the most probable of (1 - p_gm - p_wm, p_gm, p_wm) after the same block averaging;
- ``NOTICE.txt``: the template's licence notice and this provenance.

The output is byte-for-byte reproducible (gzip without a timestamp).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "salign_kernels" / "data" / "sample"
NILEARN = "nilearn==0.14.1"
MEMBER = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
FACTOR = 2  # 1 mm -> 2 mm
MARGIN = 2  # voxels of background kept around the brain, at 1 mm

NOTICE = """\
Bundled sample: the ICBM 2009a nonlinear symmetric T1 template with a tissue label map
=====================================================================================

Files
  icbm152_2009a_t1_2mm.nii.gz      T1-weighted MR template, cropped to the brain, 2 mm isotropic, uint8
  icbm152_2009a_tissue_2mm.nii.gz  labels: 0 background (and CSF), 1 grey matter, 2 white matter

Derived by scripts/build_sample.py from the files mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz
shipped in the nilearn 0.14.1 wheel (PyPI): cropped to the brain's bounding box, averaged over 2x2x2
blocks; the labels are the most probable of background, grey matter and white matter.

Source: ICBM 152 Nonlinear atlases version 2009, McConnell Brain Imaging Centre, Montreal Neurological
Institute. References: V.S. Fonov, A.C. Evans, R.C. McKinstry, C.R. Almli, D.L. Collins, "Unbiased
nonlinear average age-appropriate brain templates from birth to adulthood", NeuroImage 47 (2009) S102;
V.S. Fonov et al., "Unbiased average age-appropriate atlases for pediatric studies", NeuroImage 54
(2011) 313-327; D.L. Collins, A.P. Zijdenbos, W.F.C. Baare, A.C. Evans, "ANIMAL+INSECT: Improved
Cortical Structure Segmentation", IPMI 1999.

Licence notice of the template:

Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological
Institute, McGill University. Permission to use, copy, modify, and distribute this software and its
documentation for any purpose and without fee is hereby granted, provided that the above copyright
notice appear in all copies. The authors and McGill University make no representations about the
suitability of this software for any purpose. It is provided "as is" without express or implied
warranty. The authors are not responsible for any data loss, equipment damage, property loss, or
injury to subjects or patients resulting from the use or misuse of this software package.
"""


def fetch_wheel(folder: Path) -> Path:
    """``pip download`` nilearn's wheel (no dependencies) into ``folder``."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                    NILEARN, "-d", str(folder)], check=True)
    return next(folder.glob("nilearn-*.whl"))


def read_member(wheel: zipfile.ZipFile, name: str):
    """A ``.nii.gz`` inside the wheel as a nibabel image, without unpacking it to disk."""
    import nibabel as nib

    return nib.Nifti1Image.from_bytes(gzip.decompress(wheel.read(MEMBER.format(name))))


def block_mean(array: np.ndarray, factor: int) -> np.ndarray:
    """Average non-overlapping ``factor**3`` blocks. Shape ``(X, Y, Z)`` (multiples of factor) -> /factor."""
    X, Y, Z = (n // factor for n in array.shape)
    blocks = array.reshape(X, factor, Y, factor, Z, factor)
    return blocks.mean(axis=(1, 3, 5))


def brain_box(mask: np.ndarray, margin: int, factor: int):
    """Slices of the mask's bounding box plus ``margin``, each length rounded up to a multiple of factor."""
    box = []
    for axis, n in enumerate(mask.shape):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        start, stop = max(present[0] - margin, 0), min(present[-1] + 1 + margin, n)
        length = -(-(stop - start) // factor) * factor  # rounded up to a multiple of factor
        start = min(start, n - length)  # grow toward the end, or back from it at the border
        box.append(slice(int(start), int(start + length)))
    return tuple(box)


def save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a uint8 NIfTI-1 file, gzip without timestamp so rebuilding gives the same bytes."""
    import nibabel as nib

    image = nib.Nifti1Image(array.astype(np.uint8), affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=4)  # 4: MNI152 space
    image.set_sform(affine, code=4)
    path.write_bytes(gzip.compress(image.to_bytes(), compresslevel=9, mtime=0))


def build(wheel_path: Path, out: Path) -> None:
    with zipfile.ZipFile(wheel_path) as wheel:
        t1_img, gm_img, wm_img = (read_member(wheel, name) for name in ("t1", "gm", "wm"))
    t1, gm, wm = (np.asarray(img.dataobj, dtype=np.float64) for img in (t1_img, gm_img, wm_img))
    gm, wm = gm / 255.0, wm / 255.0  # probabilities, stored as uint8 0..255
    box = brain_box((t1 > 0) | (gm > 0) | (wm > 0), MARGIN, FACTOR)
    t1, gm, wm = (block_mean(a[box], FACTOR) for a in (t1, gm, wm))
    background = np.clip(1.0 - gm - wm, 0.0, 1.0)
    labels = np.argmax(np.stack([background, gm, wm]), axis=0)

    # New voxel (i, j, k) is the centre of old voxels start + 2i .. start + 2i + 1.
    offset = np.array([s.start for s in box], dtype=np.float64) + (FACTOR - 1) / 2
    to_old = np.eye(4)
    to_old[:3, :3] *= FACTOR
    to_old[:3, 3] = offset
    affine = t1_img.affine @ to_old

    out.mkdir(parents=True, exist_ok=True)
    save(np.round(t1), affine, out / "icbm152_2009a_t1_2mm.nii.gz")
    save(labels, affine, out / "icbm152_2009a_tissue_2mm.nii.gz")
    (out / "NOTICE.txt").write_text(NOTICE)
    counts = np.bincount(labels.ravel(), minlength=3)
    print(f"grid {t1.shape} at {FACTOR} mm, labels (background, grey, white) = {counts.tolist()} voxels")
    for path in sorted(out.iterdir()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        print(f"  {path.name:<36} {path.stat().st_size / 1024:8.1f} KiB  sha256 {digest}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", type=Path, help=f"a downloaded {NILEARN} wheel (default: pip download it)")
    parser.add_argument("--out", type=Path, default=OUT, help="output folder (default: %(default)s)")
    args = parser.parse_args()
    if args.wheel is not None:
        build(args.wheel, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        build(fetch_wheel(Path(tmp)), args.out)


if __name__ == "__main__":
    main()
