"""The benchmark machinery: its extra provider is correct and a quick run renders its tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.providers import Case, chunked_dense_match, loss_function
from salign_kernels import reference
from helpers import make_features, make_mask
from spec_oracle import candidate_set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_reference_equals_the_reference(chunk):
    shape = (2, 5, 6, 7)
    a, b = make_features(shape, torch.float64)
    a.requires_grad_()
    mask_a, mask_b = make_mask(shape, 0.8, 1), make_mask(shape, 0.6, 2)
    got = chunked_dense_match(a, b, mask_a, mask_b, chunk=chunk)
    want = reference.dense_match(a, b, mask_a, mask_b)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])
    grad = torch.autograd.grad(got[0].sum(), a)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(want[0].sum(), a)[0])


@pytest.mark.parametrize("shape,window,mode", [
    ((2, 3, 5, 7), None, "sliding"), ((2, 3, 5, 7), 3, "sliding"), ((1, 3, 9, 4), 7, "sliding"),
    ((2, 3, 5, 7), 3, "partition"), ((1, 3, 8, 8), 8, "partition"), ((1, 2, 3, 4, 5), 3, "sliding"),
    ((1, 2, 3, 4, 5), (1, 3, 5), "sliding"), ((2, 2, 5, 4, 7), (2, 3, 4), "partition"),
])
def test_flops_count_the_real_candidates(shape, window, mode):
    """The GFLOP/s of the benchmarks count (query, candidate) pairs as the specification's candidate
    sets have them: borders clipped, ragged tiles smaller."""
    import itertools

    case = Case(shape, window, mode)
    spatial = shape[2:]
    pairs = sum(len(candidate_set(p, spatial, window, mode)) for p in itertools.product(*map(range, spatial)))
    assert case.pairs() == shape[0] * pairs
    assert case.flops() == 2 * shape[1] * case.pairs()
    assert Case(shape, window, mode, symmetric=True).flops() == 2 * case.flops()


def test_symmetric_providers_agree():
    case = Case((2, 6, 5, 5), symmetric=True)
    a, b = make_features(case.shape)
    want = loss_function("reference", case)(a, b)
    for provider in ("reference_chunked", "cpp", "cpp_two_pass"):
        if provider.startswith("cpp") and not __import__("salign_kernels").backends()["cpp"]:
            continue
        torch.testing.assert_close(loss_function(provider, case)(a, b), want)


def test_quick_benchmark_run_renders(tmp_path):
    env = dict(os.environ, SALIGN_BENCH_QUICK="1")
    command = [
        sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider",
        "-o", "python_files=bench_*.py", "-o", "python_functions=bench_*",
        "-k", "S-cpp-full or S-reference-full or bench_mm",
        f"--benchmark-json={tmp_path / 'cpu.json'}",
    ]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    render = subprocess.run([sys.executable, "-m", "benchmarks.render", str(tmp_path / "cpu.json")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert render.returncode == 0, render.stderr
    table = (tmp_path / "cpu.md").read_text()
    assert "| dense S | (2, 16, 8, 8) | full |" in table and "GFLOP/s" in table
    rows = json.loads((tmp_path / "cpu.json").read_text())["benchmarks"]
    providers = {r["extra_info"]["provider"] for r in rows}
    assert {"reference", "torch.mm"} <= providers
    assert all("peak_extra_mib" in r["extra_info"] for r in rows if r["extra_info"]["provider"] != "torch.mm")


def test_peak_memory_of_a_child_is_its_own():
    """The child's peak is measured even when the parent is larger (ru_maxrss would carry over)."""
    from benchmarks.peak_memory import measure_in_subprocess

    ballast = torch.ones(2**27)  # 512 MiB in this process before the child starts
    spec = dict(provider="reference", shape=[1, 8, 64, 64], window=None, window_mode="sliding",
                symmetric=False, mode="forward")
    result = measure_in_subprocess(spec)
    del ballast
    similarity_mib = (64 * 64) ** 2 * 4 / 2**20  # the reference's 64 MiB similarity matrix
    assert similarity_mib * 0.75 <= result["peak_extra_mib"] <= similarity_mib * 4, result
