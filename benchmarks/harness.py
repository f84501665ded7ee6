"""Running one benchmark case under pytest-benchmark: inputs, a correctness check, timing, memory."""

from __future__ import annotations

import math
import os
import platform
import time

import pytest
import torch

import salign_kernels as sk
from benchmarks.peak_memory import measure_in_subprocess
from benchmarks.providers import Case, loss_function, make_inputs, run_mode
from salign_kernels import reference

TARGET_SECONDS = 3.0  # time spent on the timed rounds of one case, roughly


def machine() -> str:
    """The CPU, as the README names it."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def total_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def require(provider: str, case: Case) -> None:
    """Skip cases that cannot run here: a missing backend, or a reference that would not fit."""
    if provider in ("cpp", "cpp_two_pass") and not sk.backends()["cpp"]:
        pytest.skip(f"cpp backend unavailable: {sk.backends()['cpp'].reason}")
    if provider == "reference":
        needed = 3 * case.reference_bytes()  # the matrix, its gradient, a temporary
        if needed > 0.5 * total_memory_bytes():
            pytest.skip(f"the reference would need about {needed / 2**30:.0f} GiB for this case")


def check_against_reference(fn, case: Case, feat_a, feat_b) -> None:
    """The provider's loss on the first sample equals the reference's: asserted before timing."""
    a, b = feat_a[:1].detach(), feat_b[:1].detach()
    with torch.no_grad():
        got = fn(a, b)
        want = reference.local_alignment_loss(a, b, case.window, case.mode, case.symmetric)
    torch.testing.assert_close(got.float(), want.float(), atol=1e-4, rtol=1e-4)


def run_case(benchmark, provider: str, case: Case, mode: str, group: str, size: str = "",
             measure_memory: bool = True) -> None:
    """Time one step of ``mode``; record the case, its flops and (forward, full) its peak memory."""
    require(provider, case)
    fn = loss_function(provider, case)
    feat_a, feat_b = make_inputs(case)
    check_against_reference(fn, case, feat_a, feat_b)

    start = time.perf_counter()
    run_mode(fn, feat_a, feat_b, "full")  # warm-up, and a first estimate of the time
    estimate = time.perf_counter() - start
    rounds = int(min(20, max(3, math.ceil(TARGET_SECONDS / max(estimate, 1e-3)))))

    benchmark.group = group
    benchmark.extra_info.update(
        provider=provider, mode=mode, case=case.label, size=size, shape=list(case.shape), window=case.window,
        window_mode=case.mode, symmetric=case.symmetric, dtype=str(case.dtype).replace("torch.", ""),
        gflop=case.flops() / 1e9, device=machine(), threads=torch.get_num_threads(),
        torch=torch.__version__,
    )
    if provider.startswith("cpp"):
        from salign_kernels.ops import cpp

        benchmark.extra_info["kernel_variant"] = cpp.capability()
    if mode == "backward":

        def setup():
            feat_a.grad = feat_b.grad = None
            return (fn(feat_a, feat_b),), {}

        benchmark.pedantic(lambda loss: loss.backward(), setup=setup, rounds=rounds, iterations=1)
    else:
        benchmark.pedantic(run_mode, args=(fn, feat_a, feat_b, mode), rounds=rounds, iterations=1)

    if measure_memory and mode != "backward":
        spec = dict(provider=provider, shape=list(case.shape), window=case.window, window_mode=case.mode,
                    symmetric=case.symmetric, mode=mode)
        benchmark.extra_info.update(measure_in_subprocess(spec))
