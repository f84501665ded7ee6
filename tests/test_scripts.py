"""The data scripts' conversions, on small files written here (the real sources are fetched by the scripts)."""

from __future__ import annotations

import importlib.util
import io
import plistlib
import tarfile
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gather = load_script("gather_scans")
build = load_script("build_sample")


def test_nrrd_to_nifti_lps_to_ras(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 1000
    header = {"space": "left-posterior-superior", "space directions": np.diag([0.5, 0.6, 5.0]),
              "space origin": np.array([10.0, 20.0, -30.0])}
    nrrd.write(str(tmp_path / "ct.nrrd"), array, header)
    out = gather.nrrd_to_nifti(tmp_path / "ct.nrrd", tmp_path / "ct" / "ct.nii.gz")
    image = nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(image.dataobj), array)
    # LPS (x: left, y: posterior) -> RAS: the first two world axes change sign.
    np.testing.assert_allclose(image.affine[:3, :3], np.diag([-0.5, -0.6, 5.0]))
    np.testing.assert_allclose(image.affine[:3, 3], [-10.0, -20.0, -30.0])


def test_nrrd_without_space_is_refused(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    nrrd.write(str(tmp_path / "plain.nrrd"), np.zeros((3, 3, 3), dtype=np.int16))
    with pytest.raises(ValueError, match="is not a 3D NRRD with 'space directions'"):
        gather.nrrd_to_nifti(tmp_path / "plain.nrrd", tmp_path / "x.nii.gz")


def test_inv3_to_nifti(tmp_path):
    volume = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)  # (z, y, x) as InVesalius stores it
    meta = {"matrix": {"dtype": "int16", "filename": "matrix.dat", "shape": [3, 4, 5]},
            "spacing": [0.9, 0.8, 2.5], "modality": "CT"}
    source = tmp_path / "head.inv3"
    with tarfile.open(source, "w:gz") as archive:
        for name, data in (("main.plist", plistlib.dumps(meta)), ("matrix.dat", volume.astype("<i2").tobytes())):
            info = tarfile.TarInfo(f"tmpdir/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    image = nib.load(str(gather.inv3_to_nifti(source, tmp_path / "head.nii.gz")))
    np.testing.assert_array_equal(np.asarray(image.dataobj), volume.transpose(2, 1, 0))
    assert image.header.get_zooms() == pytest.approx((0.9, 0.8, 2.5))


def test_block_mean_and_brain_box():
    array = np.arange(4 * 4 * 2, dtype=np.float64).reshape(4, 4, 2)
    np.testing.assert_allclose(build.block_mean(array, 2), array.reshape(2, 2, 2, 2, 1, 2).mean(axis=(1, 3, 5)))
    mask = np.zeros((20, 20, 20), dtype=bool)
    mask[5:10, 3:4, 16:19] = True
    box = build.brain_box(mask, margin=1, factor=2)
    for s, n in zip(box, mask.shape):
        assert (s.stop - s.start) % 2 == 0 and 0 <= s.start and s.stop <= n
    assert mask[box].sum() == mask.sum()  # the whole brain is inside
