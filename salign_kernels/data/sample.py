"""The bundled real sample: the ICBM152 2009a T1 template on a 2 mm grid with a tissue label map.

Built by ``scripts/build_sample.py`` from the files nilearn's wheel ships; the licence notice travels
with the files (``sample/NOTICE.txt``).
"""

from __future__ import annotations

from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"

#: The T1-weighted MR template, uint8 on disk, RAS+, 2 mm isotropic.
SAMPLE_IMAGE = SAMPLE_DIR / "icbm152_2009a_t1_2mm.nii.gz"

#: Its tissue labels on the same grid.
SAMPLE_LABEL = SAMPLE_DIR / "icbm152_2009a_tissue_2mm.nii.gz"

#: The label values of :data:`SAMPLE_LABEL`.
SAMPLE_CLASSES = {0: "background (and CSF)", 1: "grey matter", 2: "white matter"}


def sample_paths():
    """``(image, label)``: the bundled sample's two files."""
    return SAMPLE_IMAGE, SAMPLE_LABEL
