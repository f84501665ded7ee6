"""salign_kernels.data: reading NIfTI, intensity normalisation, slices, pair sampling, the dataset, errors."""

from __future__ import annotations

import collections
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")

from salign_kernels.data import (  # noqa: E402
    SAMPLE_IMAGE,
    SAMPLE_LABEL,
    SlicePairDataset,
    find_volumes,
    load_slices,
    load_volume,
    normalize_intensity,
    sample_pair,
    to_slices,
)
from salign_kernels.data.sample import SAMPLE_DIR  # noqa: E402


def write_nifti(path, array, spacing=(1.0, 1.0, 1.0), affine=None):
    """A NIfTI file of ``array`` with a diagonal affine of ``spacing`` (or ``affine``)."""
    if affine is None:
        affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


def ramp_volume(shape=(12, 10, 8)):
    """float32 volume whose value is its slice index along axis 2 (plus a small in-plane ramp)."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return (100.0 * z + x + 0.1 * y).astype(np.float32)


@pytest.fixture
def volume_file(tmp_path):
    return write_nifti(tmp_path / "ramp.nii.gz", ramp_volume())


# ------------------------------------------------------------------------------------------- reading
def test_load_volume_shape_spacing_and_values(tmp_path):
    array = ramp_volume()
    volume = load_volume(write_nifti(tmp_path / "v.nii", array, spacing=(0.5, 0.7, 3.0)))
    assert volume.array.shape == (12, 10, 8) and volume.array.dtype == np.float32
    assert volume.spacing == pytest.approx((0.5, 0.7, 3.0))
    np.testing.assert_array_equal(volume.array, array)


def test_load_volume_reorients_to_ras(tmp_path):
    """An LPS-stored volume comes back flipped along x and y, so axis 2 stays axial."""
    array = ramp_volume()
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    volume = load_volume(write_nifti(tmp_path / "lps.nii.gz", array, affine=lps))
    np.testing.assert_array_equal(volume.array, array[::-1, ::-1, :])
    raw = load_volume(tmp_path / "lps.nii.gz", canonical=False)
    np.testing.assert_array_equal(raw.array, array)


def test_load_volume_drops_trailing_singleton(tmp_path):
    array = ramp_volume()[..., None]
    assert load_volume(write_nifti(tmp_path / "v.nii.gz", array)).array.shape == (12, 10, 8)


def test_nibabel_test_data():
    """nibabel's own files: a real 3D anatomical image loads; a 4D series is refused, naming it."""
    from nibabel.testing import data_path

    anatomical = load_slices(f"{data_path}/anatomical.nii", size=32)
    assert anatomical.images.shape[1:] == (32, 32) and anatomical.num_slices >= 2
    assert 0.0 <= anatomical.images.min() and anatomical.images.max() <= 1.0
    with pytest.raises(ValueError, match=r"example4d\.nii\.gz' has shape \(128, 96, 24, 2\).*4D"):
        load_volume(f"{data_path}/example4d.nii.gz")


def test_find_volumes_recursive_and_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    write_nifti(tmp_path / "b" / "x.nii.gz", ramp_volume())
    write_nifti(tmp_path / "a.nii", ramp_volume())
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.relative_to(tmp_path).as_posix() for p in find_volumes(tmp_path)] == ["a.nii", "b/x.nii.gz"]


# ------------------------------------------------------------------------------------------- intensity
def test_ct_window():
    hu = np.array([-2000.0, -1000.0, 0.0, 1000.0, 3000.0])
    out, modality = normalize_intensity(hu, "ct")
    assert modality == "ct"
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])
    out, _ = normalize_intensity(hu, "ct", ct_window=(-100.0, 300.0))
    np.testing.assert_allclose(out, [0.0, 0.0, 0.25, 1.0, 1.0])


def test_mr_percentiles_and_auto_detection():
    rng = np.random.default_rng(0)
    mr = rng.gamma(2.0, 100.0, size=(20, 20, 20))
    out, modality = normalize_intensity(mr, "auto")
    assert modality == "mr" and out.dtype == np.float32
    low, high = np.percentile(mr, (0.5, 99.5))
    np.testing.assert_allclose(out, np.clip((mr - low) / (high - low), 0, 1), rtol=1e-5, atol=1e-6)
    ct = np.where(rng.random((20, 20, 20)) < 0.3, -1000.0, 40.0)
    assert normalize_intensity(ct, "auto")[1] == "ct"
    assert not normalize_intensity(np.full((4, 4, 4), 7.0), "mr")[0].any()  # constant: zeros, no NaN


def test_normalisation_matches_monai():
    """The numpy formulas are MONAI's ScaleIntensityRange(Percentiles) with b in [0, 1], clip=True."""
    transforms = pytest.importorskip("monai.transforms")
    rng = np.random.default_rng(1)
    ct = rng.uniform(-1500, 2500, size=(8, 9, 10)).astype(np.float32)
    expected = transforms.ScaleIntensityRange(-1000, 1000, 0.0, 1.0, clip=True)(ct)
    np.testing.assert_allclose(normalize_intensity(ct, "ct")[0], np.asarray(expected), atol=1e-6)
    mr = rng.gamma(2.0, 50.0, size=(8, 9, 10)).astype(np.float32)
    expected = transforms.ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True)(mr)
    np.testing.assert_allclose(normalize_intensity(mr, "mr")[0], np.asarray(expected), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"modality": "pet"}, ValueError, r"modality must be one of .* got 'pet'"),
        ({"ct_window": (100.0, -100.0)}, ValueError, r"ct_window must have low < high; got \(100.0, -100.0\)"),
        ({"ct_window": "wide"}, TypeError, r"ct_window must be a pair of numbers"),
        ({"mr_percentiles": (-1.0, 99.0)}, ValueError, r"mr_percentiles must lie in \[0, 100\]"),
    ],
)
def test_normalisation_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        normalize_intensity(np.zeros((2, 2, 2)), **kwargs)


# ------------------------------------------------------------------------------------------- slices
def test_to_slices_shape_axis_and_aspect():
    array = np.zeros((20, 10, 3), dtype=np.float32)
    array[:, :, 1] = 1.0  # slice 1 is all ones: a 20 x 10 rectangle
    slices = to_slices(array, axis=2, size=20)
    assert slices.shape == (3, 20, 20) and slices.dtype == np.float32
    # Padded to 20 x 20 mm and not stretched: the 10 columns stay the middle half.
    np.testing.assert_allclose(slices[1][:, 5:15], 1.0, atol=1e-6)
    np.testing.assert_allclose(slices[1][:, :4], 0.0, atol=1e-6)
    # Anisotropic in-plane voxels: 10 voxels of 2 mm are as wide as 20 of 1 mm, so nothing is padded.
    np.testing.assert_allclose(to_slices(array, 2, 20, spacing=(1.0, 2.0, 1.0))[1], 1.0, atol=1e-6)
    assert to_slices(array, axis=0, size=8).shape == (20, 8, 8)


def test_to_slices_labels_stay_integer():
    labels = np.random.default_rng(0).integers(0, 3, size=(16, 16, 4))
    out = to_slices(labels, axis=2, size=8, labels=True)
    assert out.dtype == np.int64 and set(np.unique(out)) <= {0, 1, 2}
    np.testing.assert_array_equal(to_slices(labels, 2, 16, labels=True), np.moveaxis(labels, 2, 0))


# ------------------------------------------------------------------------------------------- pairs
def test_pair_sampling_statistics():
    """i uniform, 1 <= |j - i| <= max_offset, both directions, j inside, offsets uniform given i."""
    rng = np.random.default_rng(0)
    D, max_offset, draws = 10, 3, 20000
    pairs = [sample_pair(D, max_offset, rng) for _ in range(draws)]
    i, j = np.array(pairs).T
    d = j - i
    assert ((0 <= j) & (j < D)).all() and ((1 <= abs(d)) & (abs(d) <= max_offset)).all()
    counts = np.bincount(i, minlength=D)
    assert np.abs(counts / (draws / D) - 1).max() < 0.1  # uniform i, within 10 %
    offsets = collections.Counter(d[i == 5].tolist())  # interior slice: all six offsets allowed
    assert sorted(offsets) == [-3, -2, -1, 1, 2, 3]
    assert max(offsets.values()) / min(offsets.values()) < 1.3
    assert set(d[i == 0].tolist()) == {1, 2, 3} and set(d[i == D - 1].tolist()) == {-3, -2, -1}


def test_pair_sampling_edge_cases():
    rng = np.random.default_rng(1)
    assert {sample_pair(2, 3, rng) for _ in range(50)} == {(0, 1), (1, 0)}
    pairs = np.array([sample_pair(30, 2, rng, slice_range=(10, 14)) for _ in range(500)])
    assert pairs.min() >= 10 and pairs.max() <= 14


# ------------------------------------------------------------------------------------------- dataset
def test_dataset_items(volume_file):
    dataset = SlicePairDataset(volume_file, size=16, max_offset=2, foreground_threshold=0.5, modality="mr")
    assert len(dataset) == 8  # one pair per slice of the single volume
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["slice_a"].shape == (1, 16, 16) and item["slice_a"].dtype == torch.float32
        i, j = item["index_a"], item["index_b"]
        assert 1 <= abs(i - j) <= 2 and 0 <= min(i, j) and max(i, j) <= 7
        assert item["pos_a"].item() == pytest.approx(i / 7) and item["pos_b"].item() == pytest.approx(j / 7)
        # The ramp's value grows with the slice index, so each slice is recognisable after normalising.
        stack = dataset.volumes[0].images
        torch.testing.assert_close(item["slice_b"][0], torch.from_numpy(stack[j]))
        torch.testing.assert_close(item["mask_a"], torch.from_numpy(stack[i] > 0.5))
        assert item["mask_a"].dtype == torch.bool and item["mask_a"].shape == (16, 16)


def test_dataset_masks_only_with_threshold(volume_file):
    assert "mask_a" not in SlicePairDataset(volume_file, size=8)[0]


def test_dataset_is_deterministic_per_epoch(volume_file):
    dataset = SlicePairDataset(volume_file, size=8, pairs_per_volume=64, seed=3)
    first = [(dataset[k]["index_a"], dataset[k]["index_b"]) for k in range(64)]
    assert first == [(dataset[k]["index_a"], dataset[k]["index_b"]) for k in range(64)]
    dataset.set_epoch(1)
    assert first != [(dataset[k]["index_a"], dataset[k]["index_b"]) for k in range(64)]


def test_dataset_in_dataloader_with_workers(volume_file):
    """Workers draw the same pairs as the main process (the pair depends on (seed, epoch, index))."""
    dataset = SlicePairDataset(volume_file, size=8, pairs_per_volume=12, foreground_threshold=0.2)
    batches = [next(iter(torch.utils.data.DataLoader(dataset, batch_size=6, num_workers=n))) for n in (0, 2)]
    assert batches[0]["slice_a"].shape == (6, 1, 8, 8) and batches[0]["pos_a"].shape == (6,)
    assert batches[0]["mask_b"].shape == (6, 8, 8)
    for key in ("slice_a", "slice_b", "pos_a", "pos_b", "mask_a", "index_b"):
        torch.testing.assert_close(batches[0][key], batches[1][key])


def test_dataset_folder_slab_and_transform(tmp_path):
    write_nifti(tmp_path / "a.nii.gz", ramp_volume((6, 6, 21)))
    write_nifti(tmp_path / "b.nii.gz", ramp_volume((6, 6, 11)))
    seen = []
    dataset = SlicePairDataset(tmp_path, size=8, slab=(0.5, 1.0), pairs_per_volume=200,
                               transform=lambda item: seen.append(1) or {**item, "tag": 1})
    assert len(dataset) == 400
    items = [dataset[k] for k in range(len(dataset))]
    assert len(seen) == 400 and all(item["tag"] == 1 for item in items)
    for item in items:
        D = 21 if item["volume"] == 0 else 11
        assert min(item["index_a"], item["index_b"]) >= (D - 1) // 2  # positions >= 0.5
        assert min(item["pos_a"].item(), item["pos_b"].item()) >= 0.5
    assert {item["volume"] for item in items} == {0, 1}


def test_dataset_index_out_of_range(volume_file):
    dataset = SlicePairDataset(volume_file, size=8)
    with pytest.raises(IndexError, match="index 8 is out of range for a dataset of 8 pairs"):
        dataset[8]


# ------------------------------------------------------------------------------------------- errors
def test_error_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image file not found: '.*missing\.nii\.gz'"):
        SlicePairDataset(tmp_path / "missing.nii.gz")


def test_error_missing_or_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no NIfTI files \(\*\.nii, \*\.nii\.gz\) in"):
        SlicePairDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        find_volumes(tmp_path / "nowhere")


@pytest.mark.parametrize("content", [b"", b"this is not a NIfTI file" * 20])
def test_error_corrupt_file(tmp_path, content):
    path = tmp_path / "broken.nii"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"could not read '.*broken\.nii' as a NIfTI volume"):
        load_volume(path)


def test_error_truncated_gzip(tmp_path, volume_file):
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(volume_file.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"could not read '.*truncated\.nii\.gz' as a NIfTI volume"):
        SlicePairDataset(path)


def test_error_2d_image(tmp_path):
    path = write_nifti(tmp_path / "flat.nii.gz", np.zeros((10, 12), dtype=np.float32))
    with pytest.raises(ValueError, match=r"flat\.nii\.gz' has shape \(10, 12\).*this is a 2D image"):
        SlicePairDataset(path)


@pytest.mark.parametrize("axis", [3, -4, 7])
def test_error_axis_out_of_range(volume_file, axis):
    with pytest.raises(ValueError, match=rf"axis must be in \[-3, 2\] for a 3D volume; got {axis}"):
        SlicePairDataset(volume_file, axis=axis)


def test_error_axis_type(volume_file):
    with pytest.raises(TypeError, match=r"axis must be an int; got 1.5"):
        load_slices(volume_file, axis=1.5)


def test_error_fewer_than_two_slices(tmp_path):
    path = write_nifti(tmp_path / "thin.nii.gz", np.zeros((8, 8, 1, 1), dtype=np.float32)[..., 0])
    # (8, 8, 1): a single axial slice (nibabel keeps the third dimension).
    with pytest.raises(ValueError, match=r"thin\.nii\.gz' has 1 slice along axis=2: a slice pair needs at least 2"):
        SlicePairDataset(path, axis=2)


def test_error_slab_leaves_too_few_slices(volume_file):
    with pytest.raises(ValueError, match=r"slab=\(0.5, 0.6\) keeps 1 of the 8 slices"):
        SlicePairDataset(volume_file, slab=(0.5, 0.6))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"max_offset": 0}, ValueError, r"max_offset must be >= 1; got 0"),
        ({"size": 2.5}, TypeError, r"size must be an int; got 2.5"),
        ({"size": 0}, ValueError, r"size must be >= 1; got 0"),
        ({"modality": "xray"}, ValueError, r"modality must be one of \('auto', 'ct', 'mr'\); got 'xray'"),
        ({"slab": (0.8, 0.2)}, ValueError, r"slab must satisfy 0 <= low < high <= 1; got \(0.8, 0.2\)"),
        ({"slab": 0.5}, TypeError, r"slab must be a pair"),
        ({"foreground_threshold": "high"}, TypeError, r"foreground_threshold must be a float or None"),
        ({"transform": 3}, TypeError, r"transform must be callable or None; got 3"),
        ({"pairs_per_volume": 0}, ValueError, r"pairs_per_volume must be >= 1; got 0"),
        ({"seed": -1}, ValueError, r"seed must be >= 0; got -1"),
        ({"ct_window": (5.0, 5.0)}, ValueError, r"ct_window must have low < high; got \(5.0, 5.0\)"),
    ],
)
def test_error_options_checked_before_reading(tmp_path, kwargs, error, match):
    """Bad options raise at once, even before the (here missing) file would be read."""
    with pytest.raises(error, match=match):
        SlicePairDataset(tmp_path / "never_read.nii.gz", **kwargs)


def test_error_label_grid_mismatch(tmp_path, volume_file):
    label = write_nifti(tmp_path / "label.nii.gz", np.zeros((5, 5, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"label_path '.*label\.nii\.gz' has shape \(5, 5, 5\)"):
        load_slices(volume_file, label_path=label)


def test_error_empty_sequence():
    with pytest.raises(ValueError, match="data is an empty sequence"):
        SlicePairDataset([])


# ------------------------------------------------------------------------------------------- sample
def test_bundled_sample():
    stack = load_slices(SAMPLE_IMAGE, label_path=SAMPLE_LABEL, size=32)
    assert stack.modality == "mr" and stack.num_slices == 80
    assert set(np.unique(stack.labels)) == {0, 1, 2}
    brain = stack.labels > 0
    assert stack.images[brain].mean() > 3 * stack.images[~brain].mean()  # labels sit on the brain
    notice = (SAMPLE_DIR / "NOTICE.txt").read_text()
    assert "McConnell Brain Imaging Centre" in notice and "Permission to use, copy, modify" in notice
    total = sum(p.stat().st_size for p in SAMPLE_DIR.iterdir())
    assert total < 2 * 2**20  # "a few MB at most"


def test_imports_without_optional_packages(tmp_path, volume_file):
    """salign_kernels and salign_kernels.data import without nibabel/monai; reading says what to install."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["nibabel"] = None  # makes `import nibabel` raise ImportError
        sys.modules["monai"] = None
        import salign_kernels, salign_kernels.data
        try:
            salign_kernels.data.load_volume({str(volume_file)!r})
        except ImportError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "needs the optional package 'nibabel'" in out and 'pip install "salign-kernels[data]"' in out
