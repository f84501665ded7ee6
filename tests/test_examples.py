"""The example scripts' --smoke paths, their command-line checks, and their building blocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("monai")
pytest.importorskip("nibabel")

import salign_kernels as sk  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))
import pretrain_sal  # noqa: E402
import pretrain_sal3d  # noqa: E402


#: One thread per process: on shared cores, two OpenMP threads of small 3D convolutions that wait
#: on each other run several times slower than one (the DDP test does the same).
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_script(script: str, *args: str, check: bool = True, env=None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                            cwd=ROOT, timeout=600, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def test_pretrain_smoke(tmp_path):
    out = run_script("pretrain_sal.py", "--smoke", "--out", str(tmp_path)).stdout
    backend = sk.resolve_backend("auto", "cpu")
    assert f"backend {backend} on cpu" in out and f"pairs/s  backend {backend}" in out
    assert "epoch   1/1  loss" in out and "spread" in out
    for name in ("sal_pretrain.pt", "sal_matches.png", "sal_curves.png", "sal_history.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "sal_matches.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoint = torch.load(tmp_path / "sal_pretrain.pt", weights_only=False)
    assert {"unet", "embed", "head", "args", "history", "backend", "matches"} <= set(checkpoint)
    assert checkpoint["backend"] == backend and checkpoint["args"]["size"] == 32
    unet = pretrain_sal.build_unet()
    unet.load_state_dict(checkpoint["unet"])  # the full U-Net: fine-tuning loads it as it is
    history = json.loads((tmp_path / "sal_history.json").read_text())
    assert history[0]["pairs_per_s"] > 0 and np.isfinite(history[0]["total"])


def test_pretrain_smoke_every_knob(tmp_path):
    """Window, one direction, GP weight, no masks, explicit backend and device, a folder of data."""
    data = tmp_path / "scans"
    data.mkdir()
    from salign_kernels.data import SAMPLE_IMAGE

    (data / "copy.nii.gz").write_bytes(SAMPLE_IMAGE.read_bytes())
    out = run_script("pretrain_sal.py", "--smoke", "--data", str(data), "--window", "3", "--no-symmetric",
                     "--gp-weight", "0.5", "--fg-threshold", "none", "--backend", "reference", "--device", "cpu",
                     "--axis", "1", "--max-offset", "2", "--out", str(tmp_path / "o")).stdout
    assert "window 3, symmetric=False, gp_weight=0.5" in out and "backend reference on cpu" in out
    assert "along axis 1" in out


def test_pretrain_collapse_warning(tmp_path):
    """The monitor warns when the spread falls below the threshold (here: a threshold it cannot reach)."""
    result = run_script("pretrain_sal.py", "--smoke", "--collapse-threshold", "5", "--out", str(tmp_path))
    assert "feature collapse: spread" in result.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--size", "50"], "--size must be a multiple of 16"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--window", "41", "--size", "96"], "--window 41 is larger than the feature map (24"),
        (["--data", "no/such/file.nii.gz"], "image file not found: 'no/such/file.nii.gz'"),
        (["--backend", "fastest"], "invalid choice: 'fastest'"),
    ],
)
def test_pretrain_bad_flags(tmp_path, flags, message):
    result = run_script("pretrain_sal.py", *flags, "--out", str(tmp_path), check=False)
    assert result.returncode != 0 and message in result.stderr


def test_finetune_smoke(tmp_path):
    out = run_script("finetune.py", "--smoke", "--out", str(tmp_path)).stdout
    assert "| labelled slices k | init |" in out and "| 1 | random |" in out and "| 1 | SAL |" in out
    results = json.loads((tmp_path / "finetune_results.json").read_text())
    assert {r["init"] for r in results["runs"]} == {"random", "SAL"}
    for run in results["runs"]:
        assert all(0.0 <= d <= 1.0 for d in run["dice"].values())
    assert (tmp_path / "finetune_curves.png").stat().st_size > 0


def test_finetune_rejects_overlapping_slabs(tmp_path):
    result = run_script("finetune.py", "--smoke", "--test-slab", "0.5", "0.9", "--out", str(tmp_path), check=False)
    assert result.returncode != 0 and "no slice leakage" in result.stderr


def test_pretrain_monai_smoke():
    """SAL in MONAI's SupervisedTrainer: two iterations, each logging the loss and its parts."""
    pytest.importorskip("ignite")
    out = run_script("pretrain_sal_monai.py", "--smoke", env=ONE_THREAD).stdout
    lines = [line for line in out.splitlines() if line.startswith("epoch 1 iteration")]
    assert len(lines) == 2 and all("total " in line and "(local " in line and "positional " in line for line in lines)


def test_pretrain_lightning_smoke():
    """SAL as a LightningModule: one epoch, the logged parts printed at its end."""
    pytest.importorskip("lightning")
    out = run_script("pretrain_sal_lightning.py", "--smoke", env=ONE_THREAD).stdout
    line = next(line for line in out.splitlines() if line.startswith("epoch 0:"))
    assert all(f"'{part}': '" in line for part in ("total", "local", "positional"))


# ------------------------------------------------------------------------------------------- blocks
def test_feature_spread_detects_collapse():
    constant = torch.ones(2, 16, 6, 6) + 1e-7 * torch.randn(2, 16, 6, 6)
    spread = lambda x: float(pretrain_sal.feature_spread(x).pow(2).sum().sqrt())
    assert spread(constant) < 1e-3
    assert 0.9 < spread(torch.randn(4, 16, 12, 12)) <= 1.0  # random directions: RMS distance ~ 1
    mask = torch.zeros(2, 6, 6, dtype=torch.bool)
    mask[:, :3] = True
    half = torch.cat([torch.randn(2, 16, 3, 6), torch.ones(2, 16, 3, 6)], dim=2)
    assert spread(half) < 0.9 < float(pretrain_sal.feature_spread(half, mask).pow(2).sum().sqrt())


def test_feature_mask_any_pixel():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 5, 2] = True
    grid = pretrain_sal.feature_mask(mask, (2, 2))
    assert grid.tolist() == [[[False, False], [True, False]]]


def test_sal_encoder_shapes_and_gradients():
    unet = pretrain_sal.build_unet()
    encoder = pretrain_sal.SALEncoder(unet, embed_dim=8)
    features = encoder(torch.rand(2, 1, 32, 32))
    assert features.shape == (2, 8, 8, 8)
    features.square().mean().backward()
    for block in ("conv_0", "down_1", "down_2", "down_3", "down_4"):
        grads = [p.grad for p in getattr(encoder, block).parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), block
    # The blocks are the U-Net's own: training the encoder trains the U-Net; the decoder is not held.
    assert encoder.down_4 is unet.down_4 and not any(n.startswith("upcat") for n, _ in encoder.named_modules())


def test_feature_mask_and_spread_3d():
    mask = torch.zeros(1, 8, 8, 8, dtype=torch.bool)
    mask[0, 5, 2, 7] = True
    grid = pretrain_sal.feature_mask(mask, (2, 2, 2))
    assert grid.shape == (1, 2, 2, 2) and grid.sum() == 1 and grid[0, 1, 0, 1]
    spread = lambda x, m=None: float(pretrain_sal.feature_spread(x, m).pow(2).sum().sqrt())
    assert spread(torch.ones(2, 16, 3, 4, 5)) < 1e-3 and 0.9 < spread(torch.randn(2, 16, 6, 6, 6)) <= 1.0
    half = torch.cat([torch.randn(2, 16, 3, 6, 6), torch.ones(2, 16, 3, 6, 6)], dim=2)
    upper = torch.zeros(2, 6, 6, 6, dtype=torch.bool)
    upper[:, :3] = True
    assert spread(half) < 0.9 < spread(half, upper)


def test_pretrainer_takes_the_datasets_channel_first_masks():
    """A batch of the pair dataset (masks (B, 1, S, S)) goes into the pre-training step as it is: the masks
    are pooled onto the stride-4 feature grid, a cell being foreground when any of its pixels is."""
    from salign_kernels.data import SAMPLE_IMAGE, SlicePairDataset

    dataset = SlicePairDataset(SAMPLE_IMAGE, size=32, foreground_threshold=0.3)
    batch = torch.utils.data.default_collate([dataset[k] for k in (30, 40)])
    assert batch["mask_a"].shape == (2, 1, 32, 32) and batch["mask_a"].dtype == torch.bool
    encoder = pretrain_sal.SALEncoder(pretrain_sal.build_unet(), embed_dim=8)
    criterion = sk.SALoss(8, backend="reference")
    model = pretrain_sal.SALPretrainer(encoder, criterion)
    inputs = (batch["slice_a"], batch["slice_b"], batch["pos_a"], batch["pos_b"])
    out, feat_a = model(*inputs, batch["mask_a"], batch["mask_b"])
    with torch.no_grad():
        feats = encoder(torch.cat(inputs[:2])).chunk(2)
        cells = [torch.nn.functional.max_pool2d(batch[key].float(), 4)[:, 0] > 0 for key in ("mask_a", "mask_b")]
        assert 0 < cells[0].float().mean() < 1  # the masks leave some cells out
        want = criterion(*feats, *inputs[2:], *cells)
        unmasked = criterion(*feats, *inputs[2:])
    torch.testing.assert_close(feat_a, feats[0])
    torch.testing.assert_close(out.local, want.local)
    assert not torch.allclose(out.local, unmasked.local)


def test_sal_encoder_3d_shapes_and_gradients(one_thread):
    unet = pretrain_sal.build_unet(features=pretrain_sal3d.FEATURES, spatial_dims=3)
    encoder = pretrain_sal.SALEncoder(unet, embed_dim=4)
    assert encoder.spatial_dims == 3 and isinstance(encoder.embed, torch.nn.Conv3d)
    features = encoder(torch.rand(2, 1, 32, 32, 16))
    assert features.shape == (2, 4, 8, 8, 4)
    features.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.down_4.parameters())


# ------------------------------------------------------------------------------------------- 3D example
def test_pretrain3d_smoke(tmp_path):
    out = run_script("pretrain_sal3d.py", "--smoke", "--out", str(tmp_path), env=ONE_THREAD).stdout
    backend = sk.resolve_backend("auto", "cpu")
    assert "SAL 3D pre-training: 1 volume(s) of 51x63x53 (3.0/3.0/3.0 mm voxels); crops 32x32x32" in out
    assert f"backend {backend} on cpu" in out and f"pairs/s  backend {backend}" in out
    assert "epoch   1/1  loss" in out and "(local " in out and "positional " in out and "spread" in out
    assert "dense matches of a sub-volume pair, after SAL: mean shift" in out
    for name in ("sal3d_pretrain.pt", "sal3d_matches.png", "sal3d_curves.png", "sal3d_history.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "sal3d_matches.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoint = torch.load(tmp_path / "sal3d_pretrain.pt", weights_only=False)
    assert {"unet", "embed", "head", "args", "history", "backend", "matches"} <= set(checkpoint)
    assert checkpoint["backend"] == backend and checkpoint["args"]["crop"] == (32, 32, 32)
    assert set(checkpoint["matches"]["after SAL"]) == {"mean_shift_mm", "nearest_cell", "same_cell_in_crop"}
    unet = pretrain_sal.build_unet(features=checkpoint["features"], spatial_dims=3)
    unet.load_state_dict(checkpoint["unet"])  # the full 3D U-Net, ready for fine-tuning
    assert checkpoint["head"]["mlp.2.weight"].shape[0] == 3  # the positional head predicts 3 offsets
    history = json.loads((tmp_path / "sal3d_history.json").read_text())
    assert history[0]["pairs"] == 4 and history[0]["pairs_per_s"] > 0 and np.isfinite(history[0]["total"])


def test_pretrain3d_knobs(tmp_path, capsys, one_thread):
    """Per-axis crop, offsets and window, one direction, no masks, the reference backend, a folder."""
    data = tmp_path / "scans"
    data.mkdir()
    from salign_kernels.data import SAMPLE_IMAGE

    (data / "copy.nii.gz").write_bytes(SAMPLE_IMAGE.read_bytes())
    pretrain_sal3d.main(["--smoke", "--data", str(data), "--crop", "32", "32", "16",
                         "--max-offset", "3", "3", "0", "--spacing", "none", "--window", "1", "3", "3",
                         "--no-symmetric", "--fg-threshold", "none", "--backend", "reference",
                         "--device", "cpu", "--gp-weight", "0.5", "--no-progress",
                         "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert "76x94x80 (the files' grids); crops 32x32x16, offsets up to (3, 3, 0); features 8 x 8x8x4" in out
    assert "window (1, 3, 3), symmetric=False, gp_weight=0.5" in out and "backend reference on cpu" in out
    assert (tmp_path / "o" / "sal3d_matches.png").stat().st_size > 0


@pytest.mark.parametrize(
    "flags, error, message",
    [
        (["--crop", "40"], SystemExit, r"--crop must be multiples of 16, at least one of them >= 32"),
        (["--crop", "16"], SystemExit, r"--crop must be multiples of 16.*got \(16, 16, 16\)"),
        (["--crop", "32", "32"], SystemExit, r"--crop takes one value \(every axis\) or three .*got 32 32"),
        (["--max-offset", "0"], SystemExit, r"--max-offset must be >= 1 on at least one axis; got \(0, 0"),
        (["--max-offset", "2", "-1", "2"], SystemExit, r"--max-offset must be >= 0 on every axis; got 2 -1"),
        (["--spacing", "0"], SystemExit, r"--spacing must be > 0 mm; got \(0.0, 0.0, 0.0\)"),
        (["--spacing", "2", "-1", "2"], SystemExit, r"--spacing must be > 0 mm; got \(2.0, -1.0, 2.0\)"),
        (["--window", "9"], SystemExit, r"--window \(9, 9, 9\) is larger than the feature map \(8, 8, 8\)"),
        (["--window", "3", "none"], SystemExit, r"--window takes one value .* or none; got 3 None"),
        (["--epochs", "0"], SystemExit, r"--epochs must be >= 1; got 0"),
        (["--window", "4"], ValueError, r"window must be odd in sliding mode"),
        (["--crop", "64", "--spacing", "4"], ValueError, r"crop_size \(64, 64, 64\) is larger than the"),
        (["--data", "no/such/file.nii.gz"], FileNotFoundError, r"image file not found: 'no/such/file\.nii"),
    ],
)
def test_pretrain3d_bad_flags(tmp_path, flags, error, message):
    with pytest.raises(error, match=message):
        pretrain_sal3d.main([*flags, "--out", str(tmp_path)])
    assert not (tmp_path / "sal3d_pretrain.pt").exists()


@pytest.mark.parametrize("flags, message", [
    (["--crop", "x"], "argument --crop: not an int: 'x'"),
    (["--spacing", "fine"], "argument --spacing: not a number: 'fine'"),
    (["--backend", "fastest"], "invalid choice: 'fastest'"),
])
def test_pretrain3d_bad_flag_types(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        pretrain_sal3d.main([*flags, "--out", str(tmp_path)])
    assert message in capsys.readouterr().err


def coord_dataset(tmp_path):
    """A (40, 40, 40) volume whose normalised value encodes its voxel: x + 40 y + 1600 z over 64001."""
    nib = pytest.importorskip("nibabel")
    from salign_kernels.data import SubVolumePairDataset

    x, y, z = np.meshgrid(*(np.arange(40),) * 3, indexing="ij")
    path = tmp_path / "coords.nii.gz"
    nib.save(nib.Nifti1Image((x + 40 * y + 1600 * z).astype(np.float32), np.eye(4)), str(path))
    return SubVolumePairDataset(path, crop_size=32, max_offset=4, modality="ct", ct_window=(-1.0, 64000.0),
                                foreground_threshold=0.0)


def test_match_picture_metrics(tmp_path):
    """The picture's numbers tell matches of the anatomy from matches of the place in the crop."""
    dataset = coord_dataset(tmp_path)
    assert pretrain_sal3d.picture_pair(dataset) == ((4, 4, 4), (8, 8, 8))  # centred, then + max_offset

    def anatomy(crops):
        """Each feature cell's (first) voxel, decoded from its value: features that follow the anatomy."""
        value = (crops[:, 0, ::4, ::4, ::4].double() * 64001 - 1).round()
        coords = torch.stack([value % 40, (value // 40) % 40, value // 1600], dim=1)  # (B, 3, 8, 8, 8)
        angle = coords * (torch.pi / 64)  # below pi: nearer voxels are more similar on every axis
        return torch.cat([angle.cos(), angle.sin()], dim=1).float()

    place = torch.randn(1, 6, 8, 8, 8)
    encoders = {"anatomy": anatomy, "place in crop": lambda crops: place.expand(len(crops), -1, -1, -1, -1)}
    stats = pretrain_sal3d.match_picture(encoders, dataset, tmp_path / "m.png", "cpu", "auto")
    assert (tmp_path / "m.png").stat().st_size > 0
    # Crop b starts one cell (4 voxels) further on every axis: the queries of crop a's last 7 cells per
    # axis have their anatomy in crop b; the others are matched one cell short on the axes where they
    # fall outside.
    assert stats["anatomy"]["nearest_cell"] == pytest.approx(7**3 / 8**3)
    # Only the corner query, one cell short on every axis, lands on its own cell of crop b.
    assert stats["anatomy"]["same_cell_in_crop"] == pytest.approx(1 / 8**3)
    shifts = [4.0 * np.sqrt(k) for k in range(4)]  # 0 to 3 axes one cell short
    expected = sum(n * s for n, s in zip((343, 3 * 49, 3 * 7, 1), shifts)) / 512
    assert stats["anatomy"]["mean_shift_mm"] == pytest.approx(expected, rel=1e-5)
    assert stats["place in crop"] == pytest.approx(
        {"mean_shift_mm": 4.0 * np.sqrt(3), "nearest_cell": 0.0, "same_cell_in_crop": 1.0})


def test_curves_figure_is_readable_on_its_own():
    """Each panel has a title and a legend; the local loss is on a log axis; the threshold is named."""
    pytest.importorskip("matplotlib")
    history = [{"epoch": e, "total": 1.0 / e, "local": 10.0 ** -e, "positional": 0.3, "spread": 0.9,
                "min_channel_std": 0.05, "channels": 64} for e in range(1, 4)]
    fig = pretrain_sal.curves_figure(history, collapse_threshold=0.1)
    local, parts, monitor = fig.axes
    assert local.get_yscale() == "log"
    for ax in fig.axes:
        assert ax.get_title() and ax.get_legend() is not None and ax.get_xlabel() == "epoch"
    labels = [t.get_text() for t in monitor.get_legend().get_texts()]
    assert any("collapse threshold 0.1" in label for label in labels)
    assert fig._suptitle is not None and "SAL pre-training" in fig._suptitle.get_text()
