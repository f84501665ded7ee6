"""GPU benchmarks of the LA / WLA loss: forward, backward and both, per provider and dtype.

pytest-benchmark on the shared providers of :mod:`benchmarks.providers`, one group per (case,
mode); ``extra_info`` holds the case, provider, dtype, shape, device name, the peak memory of one
step over the inputs (``torch.cuda.max_memory_allocated``) and, for dense cases, the flops of the
similarities. Every provider's loss is checked once against the chunked reference before it is
timed; each timing synchronises the device.

Run through ``make gpu-check`` (``benchmarks/gpu_check.py``), which turns the results into the
Triton backend's goals; each timing is also appended as one JSON line to ``$SALIGN_BENCH_ROWS``
when set, so that a run stopped at its time limit keeps what it measured. ``SALIGN_BENCH_SMOKE=1``
shrinks every case to a tiny CPU problem (the Triton kernels then need ``TRITON_INTERPRET=1``): a
dry run of this file's logic, not a measurement. It runs only when ``SALIGN_BENCH_GPU=1`` (set by
gpu_check) or in the smoke mode, so that ``make bench`` stays a CPU benchmark.
"""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch

from benchmarks.providers import (
    GPU_DENSE_SHAPE,
    GPU_LARGE_SHAPE,
    GPU_VOLUME_SHAPE,
    Case,
    chunked_dense_match,
    loss_function,
    make_inputs,
    provider_context,
)
from salign_kernels import reference

SMOKE = os.environ.get("SALIGN_BENCH_SMOKE") == "1"
DEVICE = "cpu" if SMOKE else "cuda"
BF16, FP32 = torch.bfloat16, torch.float32
MODES = ("forward", "backward", "full")

pytestmark = [
    pytest.mark.skipif(not SMOKE and os.environ.get("SALIGN_BENCH_GPU") != "1", reason="GPU benchmarks: make gpu-check"),
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# name: (shape, window, mode, symmetric, [(provider, dtype), ...], modes, rounds). In order of
# importance (the goals first, then what only informs a default), compiled providers last within
# a case: a run cut short by its time limit still has the key numbers.
CASES = {
    "dense": (
        GPU_DENSE_SHAPE, None, "sliding", False,
        [("triton", BF16), ("triton", FP32), ("reference", BF16), ("reference", FP32),
         ("reference_chunked", FP32), ("triton_ieee", FP32), ("triton_deterministic", BF16),
         ("reference_compiled", BF16), ("reference_compiled", FP32), ("triton_graphs", BF16),
         ("triton_composed", BF16)],
        MODES, 5,
    ),
    "sliding7": (
        GPU_DENSE_SHAPE, 7, "sliding", False,
        [("triton", BF16), ("triton", FP32), ("reference", BF16), ("reference", FP32),
         ("reference_compiled", FP32), ("triton_graphs", BF16), ("triton_composed", BF16)],
        MODES, 5,
    ),
    "partition7": (
        GPU_DENSE_SHAPE, 7, "partition", False,
        [("triton", BF16), ("reference", BF16)],
        ("forward", "full"), 5,
    ),
    "dense_large": (
        GPU_LARGE_SHAPE, None, "sliding", False,
        [("triton", BF16), ("reference_chunked", FP32)],
        ("forward", "full"), 3,
    ),
    "dense_symmetric": (
        GPU_DENSE_SHAPE, None, "sliding", True,
        [("triton", BF16), ("triton_two_pass", BF16), ("triton", FP32), ("triton_two_pass", FP32)],
        ("forward", "full"), 5,
    ),
    "dense_3d": (
        GPU_VOLUME_SHAPE, None, "sliding", False,
        [("triton", BF16), ("reference_chunked", BF16)],
        ("forward", "full"), 3,
    ),
    "sliding5_3d": (
        GPU_VOLUME_SHAPE, 5, "sliding", False,
        [("triton", BF16), ("reference", BF16)],
        ("forward", "full"), 5,
    ),
}
SMOKE_SHAPES = {"dense": (1, 8, 6, 6), "sliding7": (1, 8, 9, 9), "partition7": (1, 8, 9, 9), "dense_large": (1, 8, 8, 8),
                "dense_symmetric": (1, 8, 6, 6), "dense_3d": (1, 8, 3, 4, 4), "sliding5_3d": (1, 8, 5, 5, 5)}


def _params():
    for name, (_, _, _, _, providers, modes, _) in CASES.items():
        for provider, dtype in providers:
            for mode in modes:
                yield pytest.param(name, provider, dtype, mode, id=f"{name}-{provider}-{str(dtype)[6:]}-{mode}")


def _case(name, dtype) -> Case:
    shape, window, mode, symmetric = CASES[name][:4]
    return Case(SMOKE_SHAPES[name] if SMOKE else shape, window, mode, symmetric, dtype)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=None)
def _loss(provider, name, dtype):
    return loss_function(provider, _case(name, dtype), compile_backend="aot_eager" if SMOKE else "inductor")


@functools.lru_cache(maxsize=None)
def _inputs(name, dtype):
    return tuple(x.detach() for x in make_inputs(_case(name, dtype), device=DEVICE, requires_grad=False))


@functools.lru_cache(maxsize=None)
def _expected_loss(name, dtype):
    """The loss by the chunked reference (dense) or the reference (windows), in float32."""
    case = _case(name, dtype)
    a, b = _inputs(name, dtype)
    with torch.no_grad():
        if case.window is None:
            directions = [chunked_dense_match(a, b)] + ([chunked_dense_match(b, a)] if case.symmetric else [])
            return float(reference.alignment_loss(directions))
        return float(reference.local_alignment_loss(a, b, case.window, case.mode, case.symmetric))


def _peak_memory_mib(run):
    if DEVICE != "cuda":
        return None
    _sync()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    _sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@pytest.mark.parametrize("name,provider,dtype,mode", list(_params()))
def bench_gpu(benchmark, name, provider, dtype, mode):
    with provider_context(provider):
        _bench(benchmark, name, provider, dtype, mode)


def _bench(benchmark, name, provider, dtype, mode):
    case = _case(name, dtype)
    rounds = CASES[name][6]
    loss_fn = _loss(provider, name, dtype)
    feat_a, feat_b = _inputs(name, dtype)

    def forward():
        loss = loss_fn(feat_a.detach().requires_grad_(), feat_b.detach().requires_grad_())
        _sync()
        return loss

    def full():
        forward().backward()
        _sync()

    def backward(loss):
        loss.backward()
        _sync()

    # Correct first: the loss against the chunked reference, once per case, provider and dtype.
    got = float(forward().detach())
    expected = _expected_loss(name, dtype)
    assert abs(got - expected) <= 1e-4 * max(1.0, abs(expected)), (got, expected)

    peak = _peak_memory_mib(full if mode != "forward" else forward)
    benchmark.group = f"{name} {mode}"
    benchmark.extra_info.update(
        case=name, label=case.label, provider=provider, dtype=str(dtype).replace("torch.", ""), mode=mode,
        shape=list(case.shape), window=case.window, window_mode=case.mode, symmetric=case.symmetric,
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", torch=torch.__version__,
        peak_memory_mib=peak, gflop=case.flops() / 1e9,
    )
    if mode == "backward":
        benchmark.pedantic(backward, setup=lambda: ((forward(),), {}), rounds=rounds, warmup_rounds=1)
    elif mode == "forward":
        benchmark.pedantic(forward, rounds=rounds, warmup_rounds=1)
    else:
        benchmark.pedantic(full, rounds=rounds, warmup_rounds=1)
    _record(benchmark)


def _record(benchmark):
    """Append this timing to ``$SALIGN_BENCH_ROWS`` (JSON lines), in the layout of gpu_check's rows."""
    path = os.environ.get("SALIGN_BENCH_ROWS")
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if not path or stats is None:
        return
    info = benchmark.extra_info
    row = dict(
        case=info["case"], provider=info["provider"], dtype=info["dtype"], mode=info["mode"], shape=info["shape"],
        median_ms=stats.median * 1e3, min_ms=stats.min * 1e3, rounds=stats.rounds,
        peak_memory_mib=info["peak_memory_mib"], gflop=info["gflop"],
    )
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
