"""salign_kernels.data: reading NIfTI, intensity normalisation, slices, sub-volumes, pair sampling, the
datasets, errors."""

from __future__ import annotations

import collections
import os
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
    SubVolumePairDataset,
    crop_position,
    find_volumes,
    load_normalized_volume,
    load_slices,
    load_volume,
    normalize_intensity,
    resample_to_spacing,
    sample_crop_pair,
    sample_pair,
    to_slices,
)
from salign_kernels.data.sample import SAMPLE_DIR  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, default_collate  # noqa: E402


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
        torch.testing.assert_close(item["mask_a"], torch.from_numpy(stack[i][None] > 0.5))
        assert item["mask_a"].dtype == torch.bool and item["mask_a"].shape == (1, 16, 16)  # channel-first


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
    assert batches[0]["mask_b"].shape == (6, 1, 8, 8)
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


# ------------------------------------------------------------------------------------------- sub-volumes
def coord_volume(shape=(12, 10, 8)):
    """A volume whose voxel value ``x + 20 y + 400 z`` says where it is."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return (x + 20 * y + 400 * z).astype(np.float32)


#: A CT window that maps coord_volume's values affinely into (0, 1), unclipped.
COORD_WINDOW = (-1.0, 3999.0)


def coord_value(corner):
    """The normalised value of coord_volume's voxel at ``corner`` under COORD_WINDOW."""
    x, y, z = (int(c) for c in corner)
    return (x + 20 * y + 400 * z + 1.0) / 4000.0


@pytest.fixture
def coord_file(tmp_path):
    return write_nifti(tmp_path / "coords.nii.gz", coord_volume())


def coord_dataset(path, **kwargs):
    return SubVolumePairDataset(path, modality="ct", ct_window=COORD_WINDOW, **kwargs)


def test_crop_pair_geometry_and_offsets():
    """Both crops inside; |d| <= max_offset per axis; d != 0; every allowed offset, uniformly."""
    rng = np.random.default_rng(0)
    shape, crop, max_offset = (30, 30, 30), (10, 10, 10), (1, 2, 0)
    pairs = np.array([sample_crop_pair(shape, crop, max_offset, rng) for _ in range(5000)])  # (n, 2, 3)
    a, b = pairs[:, 0], pairs[:, 1]
    assert ((a >= 0) & (b >= 0) & (a <= 20) & (b <= 20)).all()
    d = b - a
    assert (np.abs(d) <= max_offset).all() and d.any(axis=1).all() and not d[:, 2].any()
    assert {tuple(np.unique(a[:, k])) for k in range(3)} == {tuple(range(21))}  # every corner is drawn
    interior = ((a[:, 0] >= 1) & (a[:, 0] <= 19) & (a[:, 1] >= 2) & (a[:, 1] <= 18))
    counts = collections.Counter(map(tuple, d[interior].tolist()))
    assert len(counts) == 3 * 5 - 1  # the box minus the zero vector
    assert max(counts.values()) / min(counts.values()) < 1.4


def test_crop_pair_at_the_borders():
    """With one voxel of room the offset points inward: +1 from corner 0, -1 from corner 1."""
    rng = np.random.default_rng(1)
    pairs = {sample_crop_pair((5, 4, 4), (4, 4, 4), (3, 3, 3), rng) for _ in range(100)}
    assert pairs == {((0, 0, 0), (1, 0, 0)), ((1, 0, 0), (0, 0, 0))}


def test_crop_pair_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"crop \(4, 11, 4\) is larger than the volume \(10, 10, 10\)"):
        sample_crop_pair((10, 10, 10), (4, 11, 4), (1, 1, 1), rng)
    with pytest.raises(ValueError, match=r"leaves no room for an offset in a volume of \(10, 10, 12\)"):
        sample_crop_pair((10, 10, 12), (10, 10, 4), (1, 1, 0), rng)


def test_crop_position_exact():
    assert crop_position((0, 0, 0), (5, 5, 5), (21, 11, 5)).tolist() == pytest.approx([0.1, 0.2, 0.5])
    assert crop_position((16, 6, 0), (5, 5, 5), (21, 11, 5)).tolist() == pytest.approx([0.9, 0.8, 0.5])
    # A crop of one voxel is at the slice position i / (n - 1); an axis of one voxel is at 0.
    assert crop_position((3, 0, 0), (1, 1, 1), (7, 1, 2)).tolist() == pytest.approx([0.5, 0.0, 0.0])
    assert crop_position((1, 2, 3), (2, 2, 2), (8, 8, 8)).dtype == np.float32


def test_subvolume_items(coord_file):
    dataset = coord_dataset(coord_file, crop_size=(4, 3, 5), max_offset=(2, 1, 3), pairs_per_volume=50)
    assert len(dataset) == 50
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["crop_a"].shape == (1, 4, 3, 5) and item["crop_a"].dtype == torch.float32
        assert item["pos_a"].shape == (3,) and item["pos_a"].dtype == torch.float32
        a, b = item["corner_a"], item["corner_b"]
        assert a.dtype == torch.int64 and a.shape == (3,)
        d = (b - a).abs()
        assert (d <= torch.tensor([2, 1, 3])).all() and d.any()
        crop, shape = torch.tensor([4, 3, 5]), torch.tensor([12, 10, 8])
        for corner in (a, b):
            assert (corner >= 0).all() and (corner + crop <= shape).all()
        # The crops hold the voxels at their corners: coord_volume's values say where they come from.
        for key, corner in (("crop_a", a), ("crop_b", b)):
            assert item[key][0, 0, 0, 0].item() == pytest.approx(coord_value(corner), abs=1e-6)
            last = coord_value(corner + crop - 1)
            assert item[key][0, -1, -1, -1].item() == pytest.approx(last, abs=1e-6)
        # Positions: the crop centres, normalised per axis by (n - 1).
        expected = (a.double() + torch.tensor([1.5, 1.0, 2.0])) / torch.tensor([11.0, 9.0, 7.0])
        torch.testing.assert_close(item["pos_a"].double(), expected, atol=1e-6, rtol=0)
        assert item["volume"] == 0 and "mask_a" not in item


def test_subvolume_masks(coord_file):
    dataset = coord_dataset(coord_file, crop_size=6, max_offset=2, foreground_threshold=0.5)
    assert len(dataset) == 2 * 2 * 2  # the default: the crops it takes to tile the volume
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["mask_a"].shape == (1, 6, 6, 6) and item["mask_b"].dtype == torch.bool  # channel-first
        # Values above 0.5 are the voxels with z >= 5: part of every crop, never all of it.
        assert 0 < item["mask_a"].float().mean() < 1
        torch.testing.assert_close(item["mask_a"], item["crop_a"] > 0.5)
        torch.testing.assert_close(item["mask_b"], item["crop_b"] > 0.5)


def test_subvolume_deterministic_per_epoch_and_seed(coord_file):
    corners = lambda ds: [tuple(ds[k]["corner_a"].tolist() + ds[k]["corner_b"].tolist()) for k in range(40)]
    dataset = coord_dataset(coord_file, crop_size=4, pairs_per_volume=40, seed=3)
    first = corners(dataset)
    assert first == corners(dataset)
    dataset.set_epoch(1)
    assert first != corners(dataset)
    dataset.set_epoch(0)
    assert first == corners(dataset)
    assert first != corners(coord_dataset(coord_file, crop_size=4, pairs_per_volume=40, seed=4))


def test_subvolume_in_dataloader_with_workers(coord_file):
    """Workers draw the same pairs as the main process; a batch of positions is (B, 3)."""
    dataset = coord_dataset(coord_file, crop_size=4, pairs_per_volume=12, foreground_threshold=0.3)
    dataset.set_epoch(2)
    batches = [list(torch.utils.data.DataLoader(dataset, batch_size=6, num_workers=n)) for n in (0, 2)]
    assert batches[0][0]["crop_a"].shape == (6, 1, 4, 4, 4) and batches[0][0]["pos_a"].shape == (6, 3)
    assert batches[0][0]["mask_b"].shape == (6, 1, 4, 4, 4) and batches[0][0]["corner_a"].shape == (6, 3)
    for main, worker in zip(*batches):
        for key in ("crop_a", "crop_b", "pos_a", "pos_b", "corner_a", "corner_b", "mask_a", "volume"):
            torch.testing.assert_close(main[key], worker[key])


def test_subvolume_folder_and_transform(tmp_path):
    write_nifti(tmp_path / "a.nii.gz", coord_volume((12, 10, 8)))
    (tmp_path / "b").mkdir()
    write_nifti(tmp_path / "b" / "c.nii", coord_volume((6, 6, 6)))
    seen = []
    dataset = coord_dataset(tmp_path, crop_size=5, pairs_per_volume=30,
                            transform=lambda item: seen.append(1) or {**item, "tag": 1})
    assert len(dataset) == 60 and [v.shape for v in dataset.volumes] == [(12, 10, 8), (6, 6, 6)]
    items = [dataset[k] for k in range(len(dataset))]
    assert len(seen) == 60 and all(item["tag"] == 1 for item in items)
    assert [item["volume"] for item in items] == [0] * 30 + [1] * 30
    assert all((item["corner_b"] <= 1).all() for item in items[30:])  # 6 - 5: one voxel of room


def test_resample_to_spacing():
    array = coord_volume((12, 10, 8))
    # 1 mm -> 2 mm on axes 0 and 1 (box averages of two voxels), 1 -> 0.5 mm on axis 2 (trilinear).
    out, spacing = resample_to_spacing(array, (1.0, 1.0, 1.0), (2.0, 2.0, 0.5))
    assert out.shape == (6, 5, 16) and out.dtype == np.float32 and spacing == (2.0, 2.0, 0.5)
    # coord_volume is linear, so both steps are exact: pairs of voxels average to their midpoint, and
    # voxel i of the finer axis 2 sits at source index i / 2 - 1/4 (clamped at the ends).
    k, l, i = np.meshgrid(np.arange(6), np.arange(5), np.arange(16), indexing="ij")
    expected = (2 * k + 0.5) + 20 * (2 * l + 0.5) + 400 * np.clip(i / 2 - 0.25, 0, 7)
    np.testing.assert_allclose(out, expected, atol=1e-3)
    # The field of view is kept: 3 voxels of 2.5 mm (7.5 mm) -> 4 voxels of 1.875 mm for a 2 mm target.
    assert resample_to_spacing(np.ones((3, 3, 3)), (2.5,) * 3, (2.0,) * 3)[1] == (1.875,) * 3
    same, _ = resample_to_spacing(array, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(same, array)


def test_subvolume_spacing_resamples(tmp_path):
    """A volume stored at (1, 1, 2) mm, resampled to 1 mm: twice as many voxels along axis 2."""
    path = write_nifti(tmp_path / "aniso.nii.gz", ramp_volume((12, 10, 8)), spacing=(1.0, 1.0, 2.0))
    dataset = SubVolumePairDataset(path, crop_size=8, spacing=1.0)
    assert dataset.volumes[0].shape == (12, 10, 16) and dataset.volumes[0].spacing == (1.0, 1.0, 1.0)
    direct = load_normalized_volume(path, spacing=(1, 1, 1))
    np.testing.assert_array_equal(direct.image, dataset.volumes[0].image)
    assert load_normalized_volume(path).shape == (12, 10, 8)  # no spacing: the file's grid


def test_subvolume_bundled_sample():
    dataset = SubVolumePairDataset(SAMPLE_IMAGE, crop_size=32, spacing=3.0, foreground_threshold=0.05)
    volume = dataset.volumes[0]
    assert volume.shape == (51, 63, 53) and volume.modality == "mr"
    assert volume.spacing == pytest.approx((3.0, 3.0, 3.0), abs=0.02)
    assert len(dataset) == 8
    item = dataset[0]
    assert item["crop_a"].shape == (1, 32, 32, 32) and 0.2 < item["mask_a"].float().mean() < 1.0


def test_subvolume_index_out_of_range(coord_file):
    dataset = coord_dataset(coord_file, crop_size=4, pairs_per_volume=3)
    assert dataset[-3]["corner_a"].tolist() == dataset[0]["corner_a"].tolist()
    with pytest.raises(IndexError, match="index 3 is out of range for a dataset of 3 pairs"):
        dataset[3]


def test_subvolume_crop_larger_than_volume(coord_file):
    message = r"crop_size \(4, 11, 4\) is larger than the volume: '.*coords\.nii\.gz' has shape \(12, 10, 8\)"
    with pytest.raises(ValueError, match=message + "; give a smaller crop_size"):
        coord_dataset(coord_file, crop_size=(4, 11, 4))
    # After resampling to 2 mm the volume is (6, 5, 4): a crop of 6 no longer fits.
    with pytest.raises(ValueError, match=r"has shape \(6, 5, 4\) on the \(2.0, 2.0, 2.0\) mm grid"):
        coord_dataset(coord_file, crop_size=6, spacing=2.0)


def test_subvolume_no_room_for_an_offset(coord_file):
    with pytest.raises(ValueError, match=r"crop_size \(12, 10, 4\) with max_offset \(3, 3, 0\) leaves no"):
        coord_dataset(coord_file, crop_size=(12, 10, 4), max_offset=(3, 3, 0))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"crop_size": 0}, ValueError, r"crop_size must be >= 1; got 0"),
        ({"crop_size": 2.5}, TypeError, r"crop_size must be an int or a tuple of 3 ints \(one.*got 2.5"),
        ({"crop_size": (4, 4)}, ValueError, r"crop_size must have one entry per axis \(3\); got \(4, 4\)"),
        ({"crop_size": (4, 0, 4)}, ValueError, r"crop_size must be >= 1 on every axis; got \(4, 0, 4\)"),
        ({"crop_size": (4, True, 4)}, TypeError, r"crop_size must be an int or a tuple of 3 ints"),
        ({"max_offset": 0}, ValueError, r"max_offset must be >= 1; got 0"),
        ({"max_offset": (0, 0, 0)}, ValueError, r"max_offset must be >= 1 on at least one axis; got \(0, 0"),
        ({"max_offset": (1, -1, 1)}, ValueError, r"max_offset must be >= 0 on every axis; got \(1, -1, 1\)"),
        ({"max_offset": "2"}, TypeError, r"max_offset must be an int or a tuple of 3 ints"),
        ({"spacing": 0.0}, ValueError, r"spacing must be > 0 \(mm\) on every axis; got 0.0"),
        ({"spacing": (1.0, float("nan"), 1.0)}, ValueError, r"spacing must be > 0 \(mm\) on every axis"),
        ({"spacing": (1.0, 2.0)}, ValueError, r"spacing must have one entry per axis \(3\); got \(1.0, 2"),
        ({"spacing": "fine"}, TypeError, r"spacing must be None, a number or a tuple of 3 numbers.*'fine'"),
        ({"foreground_threshold": "h"}, TypeError, r"foreground_threshold must be a float or None; got 'h'"),
        ({"modality": "xray"}, ValueError, r"modality must be one of \('auto', 'ct', 'mr'\); got 'xray'"),
        ({"mr_percentiles": (1.0, 101.0)}, ValueError, r"mr_percentiles must lie in \[0, 100\]"),
        ({"pairs_per_volume": 0}, ValueError, r"pairs_per_volume must be >= 1; got 0"),
        ({"seed": 1.5}, TypeError, r"seed must be an int; got 1.5"),
        ({"seed": -1}, ValueError, r"seed must be >= 0; got -1"),
        ({"transform": 3}, TypeError, r"transform must be callable or None; got 3"),
    ],
)
def test_subvolume_options_checked_before_reading(tmp_path, kwargs, error, match):
    """Bad options raise at once, even before the (here missing) file would be read."""
    with pytest.raises(error, match=match):
        SubVolumePairDataset(tmp_path / "never_read.nii.gz", **kwargs)


def test_subvolume_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image file not found: '.*missing\.nii\.gz'"):
        SubVolumePairDataset(tmp_path / "missing.nii.gz")
    with pytest.raises(FileNotFoundError, match=r"no NIfTI files"):
        SubVolumePairDataset(tmp_path)
    with pytest.raises(ValueError, match="data is an empty sequence"):
        SubVolumePairDataset([])
    path = write_nifti(tmp_path / "flat.nii.gz", np.zeros((10, 12), dtype=np.float32))
    with pytest.raises(ValueError, match=r"flat\.nii\.gz' has shape \(10, 12\).*this is a 2D image"):
        SubVolumePairDataset(path)


# ------------------------------------------------------------------------------------------- MONAI transforms
def plain(tensor):
    """A MONAI MetaTensor as a plain tensor (comparisons then compare values only)."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor


#: The CT window that maps asymmetric_file's values to (0, 1], unclipped.
ASYMMETRIC_WINDOW = (0.0, 127.0)


def asymmetric_slices(tmp_path):
    """Slice pairs of a (10, 12, 4) volume whose every in-plane voxel has its own value: slices (1, 12, 12)
    (10 rows padded to 12), masks ``value > 0.5``, true in the lower rows only."""
    x, y, z = np.meshgrid(np.arange(10), np.arange(12), np.arange(4), indexing="ij")
    path = write_nifti(tmp_path / "asym.nii.gz", (1 + 12 * x + y + 2 * z).astype(np.float32))
    return SlicePairDataset(path, size=12, modality="ct", ct_window=ASYMMETRIC_WINDOW, foreground_threshold=0.5)


def test_items_are_channel_first_for_monai_flip(tmp_path):
    """Flipd(spatial_axis=0) flips the first spatial axis of the slice and of its mask alike."""
    transforms = pytest.importorskip("monai.transforms")
    item = asymmetric_slices(tmp_path)[1]
    assert item["mask_a"].shape == item["slice_a"].shape == (1, 12, 12)
    assert 0 < item["mask_a"].float().mean() < 1
    out = transforms.Flipd(keys=["slice_a", "mask_a"], spatial_axis=0)(dict(item))
    torch.testing.assert_close(plain(out["slice_a"]), item["slice_a"].flip(1))
    torch.testing.assert_close(plain(out["mask_a"]), item["mask_a"].flip(1))
    assert not torch.equal(plain(out["mask_a"]), item["mask_a"])  # the item is not symmetric: the flip shows
    assert torch.equal(plain(out["mask_a"]), plain(out["slice_a"]) > 0.5)
    assert out["slice_b"] is item["slice_b"] and out["mask_b"] is item["mask_b"]  # view b is left alone


def test_items_are_channel_first_for_monai_rotate90(tmp_path):
    transforms = pytest.importorskip("monai.transforms")
    item = asymmetric_slices(tmp_path)[2]
    out = transforms.Rotate90d(keys=["slice_b", "mask_b"], k=1)(dict(item))
    torch.testing.assert_close(plain(out["slice_b"]), torch.rot90(item["slice_b"], 1, (1, 2)))
    torch.testing.assert_close(plain(out["mask_b"]), torch.rot90(item["mask_b"], 1, (1, 2)))
    assert not torch.equal(plain(out["mask_b"]), item["mask_b"])
    assert torch.equal(plain(out["mask_b"]), plain(out["slice_b"]) > 0.5)


def test_items_stay_aligned_under_monai_rand_affine_2d():
    """A random rotation, scaling and shift with nearest interpolation: the mask is still image > threshold."""
    transforms = pytest.importorskip("monai.transforms")
    dataset = SlicePairDataset(SAMPLE_IMAGE, size=32, foreground_threshold=0.05)
    item = dataset[30]  # slices 19 and 21: about 40 % foreground
    affine = transforms.RandAffined(keys=["slice_a", "mask_a"], prob=1.0, rotate_range=0.6, scale_range=0.2,
                                    translate_range=3, mode="nearest", padding_mode="zeros")
    affine.set_random_state(0)
    out = affine(dict(item))
    mask = plain(out["mask_a"]) > 0.5  # MONAI resamples in float32
    assert mask.shape == (1, 32, 32)
    assert torch.equal(mask, plain(out["slice_a"]) > 0.05)
    assert not torch.equal(mask, item["mask_a"]) and 0 < mask.float().mean() < 1  # it did move the anatomy


def test_subvolume_items_stay_aligned_under_monai_3d_transforms(coord_file):
    transforms = pytest.importorskip("monai.transforms")
    dataset = coord_dataset(coord_file, crop_size=6, max_offset=2, foreground_threshold=0.5)
    item = dataset[3]
    flipped = transforms.Flipd(keys=["crop_a", "mask_a"], spatial_axis=2)(dict(item))
    torch.testing.assert_close(plain(flipped["crop_a"]), item["crop_a"].flip(3))
    torch.testing.assert_close(plain(flipped["mask_a"]), item["mask_a"].flip(3))
    assert not torch.equal(plain(flipped["mask_a"]), item["mask_a"])
    rotated = transforms.Rotate90d(keys=["crop_b", "mask_b"], k=1, spatial_axes=(0, 2))(dict(item))
    assert torch.equal(plain(rotated["mask_b"]), plain(rotated["crop_b"]) > 0.5)
    assert torch.equal(plain(rotated["mask_b"]), torch.rot90(item["mask_b"], 1, (1, 3)))
    affine = transforms.RandAffined(keys=["crop_a", "mask_a"], prob=1.0, rotate_range=(0.5, 0.5, 0.5),
                                    translate_range=1, mode="nearest", padding_mode="zeros")
    affine.set_random_state(1)
    out = affine(dict(item))
    mask = plain(out["mask_a"]) > 0.5
    assert mask.shape == (1, 6, 6, 6) and torch.equal(mask, plain(out["crop_a"]) > 0.5)
    assert not torch.equal(mask, item["mask_a"])


def test_each_view_its_own_random_transform():
    """One random transform per view (keys slice_a/mask_a, slice_b/mask_b), as the README shows."""
    transforms = pytest.importorskip("monai.transforms")

    def view(image, mask):
        return [transforms.RandAffined(keys=[image, mask], prob=1.0, rotate_range=0.4, translate_range=2,
                                       mode="nearest", padding_mode="zeros"),
                transforms.RandFlipd(keys=[image, mask], prob=0.5, spatial_axis=0)]

    pair = transforms.Compose([*view("slice_a", "mask_a"), *view("slice_b", "mask_b"),
                               transforms.EnsureTyped(keys=["mask_a", "mask_b"], dtype=torch.bool,
                                                      track_meta=False)])
    pair.set_random_state(3)
    dataset = SlicePairDataset(SAMPLE_IMAGE, size=32, foreground_threshold=0.05, transform=pair)
    plain_items = SlicePairDataset(SAMPLE_IMAGE, size=32, foreground_threshold=0.05)
    for index in (10, 30):  # pairs of slices with about 40 % foreground
        item = dataset[index]
        for view_ in "ab":
            mask = item[f"mask_{view_}"]
            assert mask.dtype == torch.bool and mask.shape == (1, 32, 32)
            assert torch.equal(mask, plain(item[f"slice_{view_}"]) > 0.05)
        # The same pair as without the transform, and both views moved.
        before = plain_items[index]
        assert item["index_a"] == before["index_a"] and item["index_b"] == before["index_b"]
        assert not torch.equal(item["mask_a"], before["mask_a"]) and not torch.equal(item["mask_b"], before["mask_b"])


# ------------------------------------------------------------------------------------------- epochs and workers
def _with_pid(item):
    """Tag an item with the process that drew it (at module level: spawned workers unpickle it by name)."""
    return {**item, "pid": os.getpid()}


def main_process_batches(dataset, batch_size, order=None):
    """What the DataLoader should give: the main process's items of the current epoch, collated."""
    order = range(len(dataset)) if order is None else order
    items = [dataset[k] for k in order]
    return [default_collate(items[k:k + batch_size]) for k in range(0, len(items), batch_size)]


def assert_same_batches(got, want, keys):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for key in keys:
            torch.testing.assert_close(g[key], w[key], rtol=0, atol=0)


def check_persistent_workers(dataset, keys, context):
    """Two epochs through two persistent workers: each gives the main process's items of its epoch."""
    loader = DataLoader(dataset, batch_size=4, num_workers=2, persistent_workers=True,
                        multiprocessing_context=context)
    drawn, workers = [], []
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        batches = list(loader)
        assert_same_batches(batches, main_process_batches(dataset, 4), keys)
        drawn.append(torch.cat([b[keys[0]] for b in batches]))
        workers.append(set(torch.cat([b["pid"] for b in batches]).tolist()))
    assert not torch.equal(drawn[0], drawn[1])  # fresh pairs in the second epoch
    # The same two worker processes served both epochs: they are persistent, not restarted.
    assert workers[0] == workers[1] and len(workers[0]) == 2 and os.getpid() not in workers[0]


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_set_epoch_reaches_persistent_workers(volume_file, context):
    dataset = SlicePairDataset(volume_file, size=8, pairs_per_volume=16, foreground_threshold=0.3, seed=4,
                               transform=_with_pid)
    check_persistent_workers(dataset, ("index_a", "index_b", "slice_a", "slice_b", "pos_a", "mask_b"), context)


def test_subvolume_set_epoch_reaches_persistent_workers(coord_file):
    dataset = coord_dataset(coord_file, crop_size=4, pairs_per_volume=16, foreground_threshold=0.3,
                            transform=_with_pid)
    check_persistent_workers(dataset, ("corner_a", "corner_b", "crop_a", "pos_b", "mask_a"), "fork")


def test_set_epoch_with_distributed_sampler_and_persistent_workers(volume_file):
    """Each DDP rank (its own dataset, sampler and persistent workers) gets its own share of each epoch's
    items, and those are the items of that epoch."""
    options = {"size": 8, "pairs_per_volume": 12, "seed": 1}
    reference = SlicePairDataset(volume_file, **options)
    ranks = []
    for rank in range(2):
        dataset = SlicePairDataset(volume_file, **options)
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=7)
        ranks.append((dataset, sampler, DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=2,
                                                   persistent_workers=True)))
    pairs = []
    for epoch in (0, 1):
        reference.set_epoch(epoch)
        shares = []
        for dataset, sampler, loader in ranks:
            dataset.set_epoch(epoch)
            sampler.set_epoch(epoch)
            order = list(sampler)
            assert_same_batches(list(loader), main_process_batches(reference, 2, order),
                                ("index_a", "index_b", "slice_a", "pos_b"))
            shares.append(order)
        assert sorted(shares[0] + shares[1]) == list(range(12))  # disjoint shares that cover the epoch
        pairs.append([(reference[k]["index_a"], reference[k]["index_b"]) for k in range(12)])
    assert pairs[0] != pairs[1]


@pytest.mark.parametrize("epoch, error, match", [
    (-1, ValueError, r"epoch must be >= 0; got -1"),
    (1.5, TypeError, r"epoch must be an int; got 1.5 \(float\)"),
    ("2", TypeError, r"epoch must be an int; got '2' \(str\)"),
])
def test_set_epoch_errors(volume_file, epoch, error, match):
    dataset = SlicePairDataset(volume_file, size=8)
    dataset.set_epoch(np.int64(3))
    assert dataset.epoch == 3
    with pytest.raises(error, match=match):
        dataset.set_epoch(epoch)
    assert dataset.epoch == 3  # unchanged


# ------------------------------------------------------------------------------------------- volumes in memory
def load_metatensor(path):
    """The volume as a MONAI loading pipeline gives it: a channel-first MetaTensor."""
    transforms = pytest.importorskip("monai.transforms")
    return transforms.LoadImage(ensure_channel_first=True)(str(path))


def assert_same_items(got, want):
    assert len(got) == len(want)
    for index in range(len(want)):
        a, b = got[index], want[index]
        assert a.keys() == b.keys()
        for key, value in b.items():
            if isinstance(value, torch.Tensor):
                assert a[key].dtype == value.dtype and torch.equal(a[key], value), (index, key)
            else:
                assert a[key] == value, (index, key)


def test_from_volumes_monai_sample_matches_file():
    """The bundled sample loaded by MONAI gives the items that its file gives, 2D and 3D."""
    image = load_metatensor(SAMPLE_IMAGE)
    assert image.shape == (1, 76, 94, 80)
    options = {"size": 32, "max_offset": 2, "foreground_threshold": 0.05, "seed": 3}
    from_file = SlicePairDataset(SAMPLE_IMAGE, **options)
    from_memory = SlicePairDataset.from_volumes(image, **options)
    np.testing.assert_array_equal(from_memory.volumes[0].images, from_file.volumes[0].images)
    assert from_memory.volumes[0].modality == "mr" and from_memory.paths[0].startswith("volumes (")
    assert_same_items(from_memory, from_file)
    options = {"crop_size": 16, "spacing": 4.0, "foreground_threshold": 0.05, "seed": 3, "pairs_per_volume": 10}
    from_file = SubVolumePairDataset(SAMPLE_IMAGE, **options)
    from_memory = SubVolumePairDataset.from_volumes([image], **options)
    assert from_memory.volumes[0].spacing == from_file.volumes[0].spacing
    assert_same_items(from_memory, from_file)


def test_from_volumes_metatensor_reoriented_like_file(tmp_path):
    """A file stored with permuted, flipped axes: its MetaTensor is reoriented to RAS+ as the file is."""
    affine = np.array([[0.0, 0.0, 1.5, 10.0], [-1.0, 0.0, 0.0, 5.0], [0.0, 2.0, 0.0, -3.0], [0.0, 0.0, 0.0, 1.0]])
    path = write_nifti(tmp_path / "permuted.nii.gz", coord_volume((12, 10, 8)), affine=affine)
    image = load_metatensor(path)
    assert image.shape == (1, 12, 10, 8)  # as stored
    options = {"crop_size": 4, "modality": "ct", "ct_window": COORD_WINDOW, "pairs_per_volume": 20, "seed": 1}
    for spacing in (None, 1.0):
        from_file = SubVolumePairDataset(path, spacing=spacing, **options)
        from_memory = SubVolumePairDataset.from_volumes(image, spacing=spacing, **options)
        assert from_file.volumes[0].shape == ((8, 12, 10) if spacing is None else (12, 12, 20))
        np.testing.assert_array_equal(from_memory.volumes[0].image, from_file.volumes[0].image)
        assert from_memory.volumes[0].spacing == pytest.approx(from_file.volumes[0].spacing)
        assert_same_items(from_memory, from_file)
    assert from_memory.volumes[0].spacing == pytest.approx((1.0, 1.0, 1.0))
    assert SubVolumePairDataset.from_volumes(image, **options).volumes[0].spacing == pytest.approx((1.5, 1.0, 2.0))
    slices = {"axis": 1, "size": 12, "modality": "ct", "ct_window": COORD_WINDOW, "foreground_threshold": 0.3}
    assert_same_items(SlicePairDataset.from_volumes(image, **slices), SlicePairDataset(path, **slices))


def test_from_volumes_arrays_and_tensors(tmp_path):
    """numpy arrays and tensors, plain or channel-first, any real dtype, with voxel_size: the file's items."""
    array = coord_volume((12, 10, 8))
    path = write_nifti(tmp_path / "v.nii.gz", array, spacing=(1.0, 2.0, 1.5))
    options = {"modality": "ct", "ct_window": COORD_WINDOW, "foreground_threshold": 0.3, "seed": 2}
    want3d = SubVolumePairDataset(path, crop_size=4, spacing=1.0, pairs_per_volume=12, **options)
    want2d = SlicePairDataset(path, size=16, **options)  # 2 mm in-plane voxels: a padded, resized field of view
    tensor = torch.from_numpy(array)
    for volume in (array, array[None], array.astype(np.int32), tensor[None], tensor.double(),
                   tensor.clone().requires_grad_()):
        got = SubVolumePairDataset.from_volumes(volume, voxel_size=(1.0, 2.0, 1.5), crop_size=4, spacing=1.0,
                                                pairs_per_volume=12, **options)
        assert_same_items(got, want3d)
        assert_same_items(SlicePairDataset.from_volumes(volume, voxel_size=(1.0, 2.0, 1.5), size=16, **options),
                          want2d)
    several = SubVolumePairDataset.from_volumes([array, tensor[:6, :6, :6]], voxel_size=1, crop_size=4,
                                                pairs_per_volume=5, **options)
    assert several.paths == ["volumes[0]", "volumes[1]"] and [v.shape for v in several.volumes] == [(12, 10, 8),
                                                                                                     (6, 6, 6)]
    assert [several[k]["volume"] for k in range(10)] == [0] * 5 + [1] * 5


def test_from_volumes_mixes_metatensors_and_arrays():
    """voxel_size is for the arrays; a MetaTensor keeps the voxel size of its affine."""
    monai_data = pytest.importorskip("monai.data")
    image = monai_data.MetaTensor(torch.from_numpy(coord_volume((12, 10, 8)))[None],
                                  affine=torch.diag(torch.tensor([2.0, 1.0, 3.0, 1.0], dtype=torch.float64)))
    dataset = SubVolumePairDataset.from_volumes([image, coord_volume((6, 6, 6))], voxel_size=0.5, crop_size=4)
    assert [v.spacing for v in dataset.volumes] == [(2.0, 1.0, 3.0), (0.5, 0.5, 0.5)]
    assert dataset.paths == ["volumes[0]", "volumes[1]"]


@pytest.mark.parametrize("volumes, kwargs, error, match", [
    ("scan.nii.gz", {}, TypeError, r"volumes must be a numpy array, a torch tensor or a MONAI MetaTensor, or a list "
                                   r"of them; got str \(for files, pass them to the dataset's constructor\)"),
    ({"image": np.zeros((4, 4, 4))}, {}, TypeError, r"volumes must be a numpy array.*; got dict$"),
    ([], {}, ValueError, r"volumes is an empty sequence: give at least one volume"),
    ([np.zeros((4, 4, 4)), [[1.0]]], {"voxel_size": 1.0}, TypeError,
     r"volumes\[1\] must be a numpy array, a torch tensor or a MONAI MetaTensor; got list$"),
    ([np.zeros((4, 4, 4)), "b.nii"], {"voxel_size": 1.0}, TypeError, r"volumes\[1\] .* got str \(for files, pass"),
    (np.zeros((4, 4)), {"voxel_size": 1.0}, ValueError,
     r"volumes has shape \(4, 4\): a volume must be \(X, Y, Z\) or channel-first \(1, X, Y, Z\)"),
    (torch.zeros(1, 1, 4, 4, 4), {"voxel_size": 1.0}, ValueError, r"volumes has shape \(1, 1, 4, 4, 4\): a volume"),
    ([np.zeros((2, 4, 4, 4))], {"voxel_size": 1.0}, ValueError,
     r"volumes\[0\] has shape \(2, 4, 4, 4\): a 4D volume must be channel-first \(1, X, Y, Z\) with one "
     r"channel; got 2 channels"),
    (torch.zeros(4, 4, 4, 1), {"voxel_size": 1.0}, ValueError, r"a 4D volume must be channel-first.*got 4 channels"),
    (np.zeros((4, 4, 4), dtype=bool), {"voxel_size": 1.0}, TypeError,
     r"volumes must hold real numbers \(an integer or floating dtype\); got dtype bool"),
    (torch.zeros(4, 4, 4, dtype=torch.complex64), {"voxel_size": 1.0}, TypeError, r"got dtype torch.complex64"),
    (torch.zeros(4, 4, 4, dtype=torch.bool), {"voxel_size": 1.0}, TypeError, r"got dtype torch.bool"),
    (np.full((4, 4, 4), "a"), {"voxel_size": 1.0}, TypeError, r"must hold real numbers.*got dtype <U1"),
    (np.zeros((0, 4, 4)), {"voxel_size": 1.0}, ValueError, r"volumes has shape \(0, 4, 4\): a volume must not be empty"),
    (np.zeros((4, 4, 4)), {}, ValueError, r"voxel_size is needed for volumes: numpy arrays and plain tensors carry "
                                          r"no voxel size"),
    ([np.zeros((4, 4, 4))], {"voxel_size": 0}, ValueError, r"voxel_size must be > 0 \(mm\) on every axis; got 0"),
    ([np.zeros((4, 4, 4))], {"voxel_size": (1.0, -2.0, 1.0)}, ValueError, r"voxel_size must be > 0 \(mm\)"),
    ([np.zeros((4, 4, 4))], {"voxel_size": (1.0, 2.0)}, ValueError, r"voxel_size must have one entry per axis \(3\)"),
    ([np.zeros((4, 4, 4))], {"voxel_size": "fine"}, TypeError, r"voxel_size must be None, a number or a tuple of 3"),
])
@pytest.mark.parametrize("cls", [SlicePairDataset, SubVolumePairDataset])
def test_from_volumes_bad_input(cls, volumes, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls.from_volumes(volumes, **kwargs)


def test_from_volumes_bad_metatensors():
    monai_data = pytest.importorskip("monai.data")
    image = monai_data.MetaTensor(torch.zeros(1, 4, 4, 4), affine=torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"voxel_size=\(1.0, 1.0, 1.0\) is given, but every volume is a MetaTensor"):
        SlicePairDataset.from_volumes([image, image], voxel_size=1.0)
    flat = monai_data.MetaTensor(torch.zeros(1, 4, 4, 4), affine=torch.diag(torch.tensor([1.0, 0.0, 1.0, 1.0])))
    with pytest.raises(ValueError, match=r"the voxel size of volumes \(its affine\) must be > 0 \(mm\) on every "
                                         r"axis; got \(1.0, 0.0, 1.0\)"):
        SubVolumePairDataset.from_volumes(flat)
    planar = monai_data.MetaTensor(torch.zeros(4, 4, 4), affine=torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"volumes\[0\] is a MetaTensor whose affine has shape \(3, 3\)"):
        SlicePairDataset.from_volumes([planar])


def test_from_volumes_checks_options_first_and_volume_sizes():
    with pytest.raises(ValueError, match=r"size must be >= 1; got 0"):
        SlicePairDataset.from_volumes("not a volume", size=0)
    with pytest.raises(ValueError, match=r"crop_size must be >= 1; got 0"):
        SubVolumePairDataset.from_volumes("not a volume", crop_size=0)
    with pytest.raises(ValueError, match=r"'volumes' has 1 slice along axis=2: a slice pair needs at least 2"):
        SlicePairDataset.from_volumes(np.ones((4, 4, 1)), voxel_size=1.0)
    with pytest.raises(ValueError, match=r"crop_size \(8, 8, 8\) is larger than the volume: 'volumes\[0\]' has "
                                         r"shape \(4, 4, 4\)"):
        SubVolumePairDataset.from_volumes([np.ones((4, 4, 4))], voxel_size=1.0, crop_size=8)
