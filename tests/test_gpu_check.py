"""The GPU check script (``make gpu-check``) cannot be measured here, but its plumbing can: a dry run
on CPU through Triton's interpreter, and its bar arithmetic on made-up timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.providers import Case, bf16_peak_tflops, provider_context

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _row(provider, dtype, case, mode, ms, flops=None):
    return dict(provider=provider, dtype=dtype, case=case, mode=mode, median_ms=ms,
                gflop=None if flops is None else flops / 1e9, shape=None, min_ms=ms, rounds=1, peak_memory_mib=None)


def test_bars_arithmetic():
    flops = Case((8, 128, 128, 128)).flops()
    rows = [
        _row("reference", "bfloat16", "dense", "full", 160.0),
        _row("triton", "bfloat16", "dense", "full", 10.0),
        _row("reference", "float32", "dense", "full", 40.0),
        _row("triton", "float32", "dense", "full", 10.0),
        _row("triton", "bfloat16", "dense", "forward", flops / 500e12 * 1e3, flops),  # 500 TFLOP/s
        _row("triton", "bfloat16", "dense_large", "full", 123.0),
    ]
    bars = {bar["bar"]: bar for bar in gpu_check.bars(rows, peak_tflops=1000.0)}
    assert bars["dense bf16 fwd+bwd vs reference bf16"]["value"] == pytest.approx(16.0)
    assert bars["dense bf16 fwd+bwd vs reference bf16"]["met"] is True
    assert bars["dense fp32 (3xTF32) fwd+bwd vs reference fp32"]["met"] is False  # 4x < 5x
    assert bars["dense bf16 fwd+bwd vs compiled reference bf16"]["value"] is None  # not measured
    assert bars["dense bf16 forward TFLOP/s"]["value"] == pytest.approx(500.0)
    assert bars["dense bf16 forward fraction of the dense bf16 peak"]["met"] is True
    assert bars["(4, 128, 256, 256) bf16 fwd+bwd completes"]["met"] is True
    assert bf16_peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert bf16_peak_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert bf16_peak_tflops("some other device") is None


def test_cpu_smoke_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--cpu-smoke", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["environment"]["cpu_smoke"] is True
    assert report["tests"]["failures"] == 0 and report["tests"]["passed"] > 0
    rows = report["benchmarks"]
    cases = {(r["case"], r["provider"], r["dtype"], r["mode"]) for r in rows}
    assert ("dense", "triton", "bfloat16", "full") in cases
    assert ("sliding7", "reference_compiled", "float32", "backward") in cases
    assert ("dense_large", "triton", "bfloat16", "full") in cases
    assert all(r["median_ms"] > 0 for r in rows)
    ratios = [bar for bar in report["bars"] if bar["unit"] == "x"]
    assert ratios and all(bar["value"] is not None for bar in ratios)
    assert (tmp_path / "gpu_check.md").read_text().startswith("# GPU check")
    assert (tmp_path / "benchmark.json").exists() and (tmp_path / "gpu_tests.xml").exists()
    assert len((tmp_path / "benchmark_rows.jsonl").read_text().splitlines()) == len(rows)


def test_triton_providers_agree_with_the_reference():
    import salign_kernels as sk

    if not sk.backends()["triton"]:
        pytest.skip(f"triton unavailable: {sk.backends()['triton'].reason}")
    from benchmarks.providers import loss_function
    from helpers import make_features

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for case in (Case((2, 6, 5, 5), symmetric=True), Case((2, 6, 5, 5))):
        a, b = make_features(case.shape, device=device)
        want = loss_function("reference", case)(a, b)
        two_pass = ("triton_two_pass",) if case.symmetric else ()  # always both directions
        for provider in ("triton", "triton_ieee", "triton_deterministic", "triton_graphs", "triton_composed",
                         *two_pass):
            # CUDA graphs need inductor on a GPU; here the same compiled step without them
            fn = loss_function(provider, case, compile_backend="inductor" if device == "cuda" else "aot_eager")
            with provider_context(provider):
                torch.testing.assert_close(fn(a, b), want, atol=2e-5, rtol=2e-5)
