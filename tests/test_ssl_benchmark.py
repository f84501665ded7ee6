"""The few-label SSL benchmark (benchmarks/ssl_benchmark): its losses against plain computations, its splits,
its report, and a --quick run end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("monai")
pytest.importorskip("nibabel")

from benchmarks.ssl_benchmark import data, methods, protocol, report  # noqa: E402
from benchmarks.ssl_benchmark.augment import ViewAugmenter  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "build" / "ssl-benchmark-cache"  # the test template's download, kept between runs


def test_nt_xent_is_simclr_loss_by_hand():
    torch.manual_seed(0)
    z = F.normalize(torch.randn(6, 5, dtype=torch.float64), dim=1)
    positives = methods.SimCLR.positives(None, 3, None, z.device)
    tau = 0.1
    expected = []
    for i in range(6):
        j = (i + 3) % 6
        others = [math.exp(float(z[i] @ z[k]) / tau) for k in range(6) if k != i]
        expected.append(-math.log(math.exp(float(z[i] @ z[j]) / tau) / sum(others)))
    assert float(methods.nt_xent(z, positives, tau)) == pytest.approx(np.mean(expected), rel=1e-12)


def test_pcl_positives_are_slices_within_the_threshold():
    pos = torch.tensor([0.0, 0.05, 0.5])
    got = methods.PCL.positives(methods.PCL, 3, pos, pos.device)
    close = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    expected = close.repeat(2, 2) & ~torch.eye(6, dtype=torch.bool)
    assert torch.equal(got, expected)


def test_nt_xent_averages_over_several_positives_and_skips_anchors_without_one():
    z = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=torch.float64), dim=1)
    positives = torch.tensor([[0, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    logits = (z @ z.t() / 0.5).fill_diagonal_(-math.inf)
    log_prob = logits - torch.logsumexp(logits, 1, keepdim=True)
    expected = (-(log_prob[0, 1] + log_prob[0, 2]) / 2 - log_prob[1, 0]) / 2  # row 2 has no positive
    assert float(methods.nt_xent(z, positives, 0.5)) == pytest.approx(float(expected), rel=1e-12)


def test_densecl_dense_term_matches_a_loop_over_pixels():
    torch.manual_seed(1)
    B, C, D, H, W = 2, 4, 3, 2, 3
    model = methods.DenseCL(C)
    feat_q, feat_k = torch.randn(B, C, H, W), torch.randn(B, C, H, W)
    q_map, k_map = torch.randn(B, D, H, W), torch.randn(B, D, H, W)
    mask_q = torch.ones(B, H, W, dtype=torch.bool)
    mask_q[0, 0, 0] = False  # a masked query is left out
    mask_k = torch.ones(B, H, W, dtype=torch.bool)
    got = model.dense_term(q_map, k_map, feat_q, feat_k, mask_q, mask_k)

    fq, fk = F.normalize(feat_q, dim=1).flatten(2), F.normalize(feat_k, dim=1).flatten(2)
    q, k = F.normalize(q_map, dim=1).flatten(2), F.normalize(k_map, dim=1).flatten(2)
    pooled = F.normalize(k_map.mean(dim=(2, 3)), dim=1)
    tau, losses = model.tau_dense, []
    for b in range(B):
        for p in range(H * W):
            if not mask_q[b].flatten()[p]:
                continue
            match = int(torch.argmax(fq[b, :, p] @ fk[b]))  # the backbone's best match
            logits = [float(q[b, :, p] @ k[b, :, match]) / tau]
            logits += [float(q[b, :, p] @ pooled[o]) / tau for o in range(B) if o != b]
            losses.append(-(logits[0] - math.log(sum(math.exp(v) for v in logits))))
    assert float(got) == pytest.approx(np.mean(losses), rel=1e-5)


def test_every_method_trains_its_encoder_and_transfers_only_the_encoder_blocks():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 32, 32)
    mask = torch.ones(2, 32, 32, dtype=torch.bool)
    pos = torch.tensor([0.2, 0.7])
    for name, (make, _) in methods.METHODS.items():
        method = make(16)
        before = method.encoder_state()
        assert before and all(k.startswith(methods.ENCODER_BLOCKS) for k in before), name
        loss = method(x, x.flip(-1), pos, pos, mask, mask)
        assert loss.ndim == 0 and torch.isfinite(loss), name
        loss.backward()
        grads = [p.grad for n, p in method.unet.named_parameters() if n.startswith("conv_0.")]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), f"{name}: conv_0 gets no gradient"


def test_genesis_corruption_is_reproducible_and_changes_the_image():
    x = torch.rand(3, 1, 32, 32)
    a = methods.genesis_corrupt(x, torch.Generator().manual_seed(5))
    b = methods.genesis_corrupt(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, x)
    assert torch.equal(x, x.clone())  # the input is not modified in place


def test_view_augmenter_is_seeded_and_keeps_masks_boolean():
    images, masks = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32) > 0.3
    a_img, a_mask = ViewAugmenter(3)(images, masks)
    b_img, b_mask = ViewAugmenter(3)(images, masks)
    assert torch.equal(a_img, b_img) and torch.equal(a_mask, b_mask)
    assert a_img.shape == images.shape and a_mask.dtype == torch.bool and type(a_img) is torch.Tensor
    assert float(a_img.min()) >= 0 and float(a_img.max()) <= 1
    c_img, _ = ViewAugmenter(4)(images, masks)
    assert not torch.equal(a_img, c_img)


def test_brain_box_and_slabs():
    mask = np.zeros((6, 7, 8), dtype=bool)
    mask[2:4, 1:5, 3] = True
    assert data.brain_box(mask, margin=1) == (slice(1, 5), slice(0, 6), slice(2, 5))
    source = data.fine_tuning_source(32)
    pool, val = data.slab(source, 0.25, 0.6), data.slab(source, 0.65, 0.85)
    assert len(pool) and len(val) and not set(pool) & set(val)
    split = data.take(source, pool[:2])
    assert split.images.shape == (2, 32, 32) and split.slices == tuple(pool[:2].tolist())


def test_pretraining_never_reads_the_test_template(tmp_path):
    volumes = data.pretraining_volumes(tmp_path, gather=False)
    assert volumes == [data.SAMPLE_IMAGE]
    assert not any("spm" in p.name.lower() or "avg152" in p.name.lower() for p in volumes)


def test_choose_slices_is_fixed_by_seed_and_k():
    pool = np.arange(20, 48)
    a, b = protocol.choose_slices(pool, 3, 1), protocol.choose_slices(pool, 3, 1)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 3 and set(a) <= set(pool)
    assert not np.array_equal(protocol.choose_slices(pool, 3, 2), a)


def test_readme_section_replacement(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\nold\n{report.END}\noutro\n")
    report.replace_readme_section(readme, "| new |")
    assert readme.read_text() == f"intro\n{report.START}\n| new |\n{report.END}\noutro\n"
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="ssl-benchmark"):
        report.replace_readme_section(readme, "x")
    assert report.START in (REPO / "README.md").read_text()


def run_benchmark(*args, check=True):
    return subprocess.run([sys.executable, "-m", "benchmarks.ssl_benchmark", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900, check=check)


@pytest.mark.parametrize("flags, message", [(["--size", "40"], "--size must be a multiple of 16"),
                                            (["--steps", "0"], "--steps must be >= 1"),
                                            (["--val-slab", "0.5", "0.9"], "--val-slab must lie above")])
def test_cli_rejects_bad_flags(flags, message):
    result = run_benchmark("--quick", *flags, check=False)
    assert result.returncode != 0 and message in result.stderr


def test_quick_run_end_to_end(tmp_path):
    result = run_benchmark("--quick", "--cache", str(CACHE), "--out", str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert {r["method"] for r in results["runs"]} == {"random", *methods.METHODS}
    assert {p["method"] for p in results["pretrainings"]} == set(methods.METHODS)
    for run in results["runs"]:
        assert 0 <= run["dice"]["grey matter"] <= 1 and run["best_step"] > 0
    table = (tmp_path / "table.md").read_text()
    assert all(f"| {name} |" in table for name in methods.METHODS)
    assert (tmp_path / "ssl_benchmark.png").stat().st_size > 0
    assert "fine-tunings" in result.stdout


def test_report_of_a_saved_run(tmp_path):
    """The report's figures from a hand-made run: paired differences, signs, medians, empty HD95."""
    def run(method, seed, gm, wm, hd=3.0):
        return {"method": method, "seed": seed, "k": 1, "dice": {"grey matter": gm, "white matter": wm},
                "hd95_mm": {"grey matter": hd, "white matter": hd}}

    results = {"args": {"steps": 2, "batch": 4, "size": 32, "finetune_steps": 4, "every": 2},
               "machine": "test", "seconds": 60.0,
               "runs": [run("random", 0, 0.5, 0.5), run("random", 1, 0.6, 0.6),
                        run("SAL-LA", 0, 0.6, 0.6), run("SAL-LA", 1, 0.55, 0.55, hd=math.nan)],
               "pretrainings": [{"method": "SAL-LA", "seed": s, "seconds": t, "curve": [1.0, 0.5],
                                 "spread": 0.8, "min_channel_std_x_sqrt_c": 0.4} for s, t in ((0, 10), (1, 30))]}
    text = report.markdown(results)
    assert "| 1 | SAL-LA | 0.575 ± 0.035 | 0.575 ± 0.035 | 0.575 ± 0.035 | +0.025 (+ −) | 3.000 ± 0.000 (1 empty) |" in text
    assert "| SAL-LA | 20 | 1.000 → 0.500 |" in text
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.START}\n{report.END}\n")
    report.main([str(path), "--readme", str(readme)])
    assert "| 1 | random |" in readme.read_text() and (tmp_path / "ssl_benchmark.png").exists()


def test_no_benchmarks_module_shadows_the_standard_library():
    """``python benchmarks/gpu_check.py`` puts benchmarks/ first on sys.path: a folder or module there
    named like a standard module (``ssl``, ``profile``) would replace it for torch's own imports."""
    names = {p.stem for p in (REPO / "benchmarks").iterdir() if p.suffix in ("", ".py") and p.name != "results"}
    assert not names & set(sys.stdlib_module_names)
