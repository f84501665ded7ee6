"""The example scripts' --smoke paths, their command-line checks, and their building blocks."""

from __future__ import annotations

import json
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


def run_script(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                            cwd=ROOT, timeout=600)
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
