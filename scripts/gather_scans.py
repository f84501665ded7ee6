"""Gather real patient CT and MR scans shipped inside registry packages and write them as NIfTI.

    python scripts/gather_scans.py --out scans/          # then: python examples/pretrain_sal.py --data scans/
    python scripts/gather_scans.py --out scans/ --sources pyradiomics ch2

Sources (fetched with pip and apt-get, the only registries this needs; nothing is installed):

==============  =====================================================  ==================================
name            what                                                   fetched with
==============  =====================================================  ==================================
pyradiomics     chest CT lung1, lung2 (512x512x48/61, HU); T1+Gd brain  ``pip download pyradiomics==3.0.1``
                MR brain1, brain2 (256x256x25/23); breast MR breast1    (source package; no data licence:
                                                                        use, don't redistribute)
cranium         head CT, 108x256x256, HU (InVesalius example project)  ``apt-get download invesalius-examples``
                                                                        (GPL-2)
ch2             Colin27 T1 MR, 181x217x181, 1 mm (MRIcron template)    ``apt-get download mricron-data``
itk             head T1 MR, 128x128x62 (ITK example data)              ``apt-get download
                                                                        insighttoolkit5-examples``
==============  =====================================================  ==================================

Each scan is written as ``<out>/<ct|mr>/<name>.nii.gz`` (intensities as stored: HU for CT), so
``--data <out>`` pre-trains on all of them and ``--data <out>/ct`` on the CT scans only. The scans keep
their owners' terms: they are for local use and are not part of this repository.
"""

from __future__ import annotations

import argparse
import plistlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

SOURCES = ("pyradiomics", "cranium", "ch2", "itk")
PYRADIOMICS = "pyradiomics==3.0.1"  # the 3.1.0 source package is rejected by pip
PYRADIOMICS_SCANS = {"lung1": "ct", "lung2": "ct", "brain1": "mr", "brain2": "mr", "breast1": "mr"}

# NRRD and DICOM-derived data use LPS+ world coordinates; NIfTI uses RAS+.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """Write ``array`` ``(X, Y, Z)`` with its voxel-to-RAS ``affine`` as a NIfTI-1 file."""
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.asarray(array), affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))
    return path


def nrrd_to_nifti(source: Path, path: Path) -> Path:
    """Convert a 3D NRRD file (pynrrd) with LPS ``space directions``/``space origin`` to NIfTI.

    Raises:
        ValueError: the NRRD is not 3D or lacks its spatial fields.
    """
    import nrrd

    array, header = nrrd.read(str(source))
    directions, origin = header.get("space directions"), header.get("space origin")
    if array.ndim != 3 or directions is None or origin is None:
        raise ValueError(f"'{source}' is not a 3D NRRD with 'space directions' and 'space origin'")
    space = header.get("space", "left-posterior-superior")
    if space not in ("left-posterior-superior", "LPS", "right-anterior-superior", "RAS"):
        raise ValueError(f"'{source}': unsupported NRRD space {space!r}")
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(directions, dtype=np.float64).T  # column k: the step of voxel axis k
    affine[:3, 3] = np.asarray(origin, dtype=np.float64)
    if space in ("left-posterior-superior", "LPS"):
        affine = LPS_TO_RAS @ affine
    return save_nifti(array, affine, path)


def inv3_to_nifti(source: Path, path: Path) -> Path:
    """Convert an InVesalius project (``.inv3``: a gzip tar of ``main.plist`` + raw ``matrix.dat``).

    ``matrix.dat`` holds the volume as ``main.plist``'s ``matrix`` says (dtype, shape ``(z, y, x)``),
    little-endian; ``spacing`` is ``(x, y, z)`` in mm. The project stores no orientation: the affine
    assumes the DICOM (LPS) axes, so only the axial axis (2) is certain.
    """
    with tarfile.open(source, "r:gz") as archive:
        members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
        if "main.plist" not in members:
            raise ValueError(f"'{source}' is not an InVesalius project: no main.plist inside")
        meta = plistlib.load(archive.extractfile(members["main.plist"]))
        matrix = meta["matrix"]
        raw = archive.extractfile(members[matrix["filename"]]).read()
    volume = np.frombuffer(raw, dtype=np.dtype(matrix["dtype"]).newbyteorder("<")).reshape(matrix["shape"])
    array = np.ascontiguousarray(volume.transpose(2, 1, 0))  # (z, y, x) -> (x, y, z)
    affine = LPS_TO_RAS @ np.diag([*map(float, meta["spacing"]), 1.0])
    return save_nifti(array, affine, path)


def copy_nifti(source: Path, path: Path) -> Path:
    """Re-save a NIfTI file under ``path`` (so every scan ends up as ``.nii.gz``)."""
    import nibabel as nib

    image = nib.load(str(source))
    return save_nifti(np.asarray(image.dataobj), image.affine, path)


def apt_extract(package: str, workdir: Path) -> Path:
    """``apt-get download`` a Debian package and unpack it with ``dpkg -x``; returns the folder."""
    subprocess.run(["apt-get", "download", package], cwd=workdir, check=True)
    deb = next(workdir.glob(f"{package}_*.deb"))
    target = workdir / package
    subprocess.run(["dpkg", "-x", str(deb), str(target)], check=True)
    return target


def gather_pyradiomics(workdir: Path, out: Path):
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
                    "--no-binary", ":all:", PYRADIOMICS, "-d", str(workdir)], check=True)
    sdist = next(workdir.glob("pyradiomics-*.tar.gz"))
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive.getmembers():
            name = Path(member.name).name
            scan = name.removesuffix("_image.nrrd")
            if Path(member.name).parent.name == "data" and name.endswith("_image.nrrd") and scan in PYRADIOMICS_SCANS:
                source = workdir / name
                source.write_bytes(archive.extractfile(member).read())
                yield nrrd_to_nifti(source, out / PYRADIOMICS_SCANS[scan] / f"pyradiomics_{scan}.nii.gz")


def gather_cranium(workdir: Path, out: Path):
    root = apt_extract("invesalius-examples", workdir)
    source = next(root.rglob("Cranium.inv3"))
    yield inv3_to_nifti(source, out / "ct" / "invesalius_cranium.nii.gz")


def gather_ch2(workdir: Path, out: Path):
    root = apt_extract("mricron-data", workdir)
    yield copy_nifti(next(root.rglob("templates/ch2.nii.gz")), out / "mr" / "mricron_colin27_ch2.nii.gz")


def gather_itk(workdir: Path, out: Path):
    root = apt_extract("insighttoolkit5-examples", workdir)
    yield copy_nifti(next(root.rglob("KmeansTest_T1UCharRaw.nii.gz")), out / "mr" / "itk_head_t1.nii.gz")


GATHER = {"pyradiomics": gather_pyradiomics, "cranium": gather_cranium, "ch2": gather_ch2, "itk": gather_itk}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("scans"), help="output folder (default: %(default)s)")
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES))
    args = parser.parse_args(argv)
    written = []
    for name in args.sources:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                for path in GATHER[name](Path(tmp), args.out):
                    written.append(path)
                    print(f"{name:<12} -> {path}")
            except (subprocess.CalledProcessError, StopIteration) as exc:
                print(f"{name:<12} skipped: could not fetch it ({exc or 'file not found in the package'})",
                      file=sys.stderr)
    if not written:
        raise SystemExit("no scan was gathered")
    print(f"{len(written)} scans in {args.out}; pre-train on them with: python examples/pretrain_sal.py "
          f"--data {args.out}")


if __name__ == "__main__":
    main()
