"""Every launch configuration of the Triton kernels compiles for a Hopper GPU (sm_90), checked here
without one: the interpreter, which runs the other Triton tests on CPU, never runs the compiler.
See tests/triton_aot.py."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytest.importorskip("triton")
HERE = os.path.dirname(os.path.abspath(__file__))


def _nvidia_backend_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception:
        return False
    return platform.machine().lower() in ("x86_64", "amd64")  # the bundled ptxas is an x86-64 binary


@pytest.mark.skipif(not _nvidia_backend_available(), reason="Triton's NVIDIA compiler is not usable here")
@pytest.mark.timeout(1800)  # the compile's own limit below: on 2 busy vCPUs it can pass the suite's 900 s
def test_every_kernel_configuration_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default; silences its notice
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "triton_aot.py"), "--arch", "90"],
        env=env, capture_output=True, text=True, timeout=1800,
    )
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert records and records[-1].get("summary"), result.stderr[-3000:]
    failed = [r for r in records[:-1] if not r["ok"] and not r.get("skipped_by_autotuner")]
    details = "\n".join(f"{r['kernel']} {r['constexprs']} {r['options']}: {r['error'][-500:]}" for r in failed)
    assert result.returncode == 0 and not failed, details or result.stderr[-3000:]
    kernels = {r["kernel"] for r in records[:-1]}
    assert {"_dense_match_fwd_kernel", "_dense_settle_kernel", "_window_match_fwd_kernel",
            "_match_bwd_gather_kernel", "_match_bwd_scatter_sorted_kernel", "_match_bwd_finish_kernel",
            "_prepare_kernel"} <= kernels
