"""GPU benchmarks of the LA / WLA loss: forward, backward and both, per provider and dtype.

pytest-benchmark, one group per (case, mode); ``extra_info`` holds the case, provider, dtype, shape,
device name, the peak memory of one step over the inputs (``torch.cuda.max_memory_allocated``) and,
for dense cases, the flops of the similarities. Every provider's loss is checked once against the
chunked reference before it is timed.

Run through ``make gpu-check`` (``benchmarks/gpu_check.py``), which turns the JSON into the issue's
ratios; each timing is also appended as one JSON line to ``$SALIGN_BENCH_ROWS`` when set, so that
a run stopped at its time limit keeps what it measured. ``SALIGN_BENCH_SMOKE=1`` shrinks every case to a tiny CPU problem (the Triton kernels then
need ``TRITON_INTERPRET=1``): a dry run of this file's logic, not a measurement.
"""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch

from providers import chunked_dense_match, dense_flops, make_loss
from salign_kernels import reference

SMOKE = os.environ.get("SALIGN_BENCH_SMOKE") == "1"
DEVICE = "cpu" if SMOKE else "cuda"
BF16, FP32 = torch.bfloat16, torch.float32
MODES = ("forward", "backward", "full")

# name: (shape (B, C, H, W), window, mode, [(provider, dtype), ...], modes, rounds); one-way losses
# except the cases named *_symmetric. In order of importance (the bars first, then what
# only informs a default), compiled providers last within a case: a run cut short by its time
# limit still has the key numbers.
CASES = {
    "dense": (
        (8, 128, 128, 128), None, "sliding",
        [("triton", BF16), ("triton", FP32), ("reference", BF16), ("reference", FP32),
         ("reference_chunked", FP32), ("triton_tf32x3", FP32), ("reference_compiled", BF16),
         ("reference_compiled", FP32)],
        MODES, 5,
    ),
    "sliding7": (
        (8, 128, 128, 128), 7, "sliding",
        [("triton", BF16), ("triton", FP32), ("reference", BF16), ("reference", FP32),
         ("reference_compiled", FP32)],
        MODES, 5,
    ),
    "dense_large": (
        (4, 128, 256, 256), None, "sliding",
        [("triton", BF16), ("reference_chunked", FP32)],
        ("forward", "full"), 3,
    ),
    "dense_symmetric": (
        (8, 128, 128, 128), None, "sliding",
        [("triton", BF16), ("triton_two_pass", BF16), ("triton", FP32), ("triton_two_pass", FP32)],
        ("forward", "full"), 5,
    ),
}
SMOKE_SHAPES = {"dense": (1, 8, 6, 6), "sliding7": (1, 8, 9, 9), "dense_symmetric": (1, 8, 6, 6), "dense_large": (1, 8, 8, 8)}


def _params():
    for case, (_, _, _, providers, modes, _) in CASES.items():
        for provider, dtype in providers:
            for mode in modes:
                yield pytest.param(case, provider, dtype, mode, id=f"{case}-{provider}-{str(dtype)[6:]}-{mode}")


def _shape(case):
    return SMOKE_SHAPES[case] if SMOKE else CASES[case][0]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _symmetric(case):
    return case.endswith("_symmetric")


@functools.lru_cache(maxsize=None)
def _loss(provider, window, mode, symmetric):
    return make_loss(provider, window, mode, compile_backend="aot_eager" if SMOKE else "inductor", symmetric=symmetric)


@functools.lru_cache(maxsize=None)
def _features(case, dtype):
    generator = torch.Generator().manual_seed(0)
    shape = _shape(case)
    a = torch.randn(shape, generator=generator)
    b = 0.5 * a + torch.randn(shape, generator=generator)  # nearby slices: correlated features
    return a.to(DEVICE, dtype), b.to(DEVICE, dtype)


@functools.lru_cache(maxsize=None)
def _expected_loss(case, dtype):
    """The loss by the chunked reference (dense) or the reference (windows), in float32."""
    a, b = _features(case, dtype)
    window, mode = CASES[case][1], CASES[case][2]
    with torch.no_grad():
        if window is None:
            directions = [chunked_dense_match(a, b)] + ([chunked_dense_match(b, a)] if _symmetric(case) else [])
            return float(reference.alignment_loss(directions))
        return float(reference.local_alignment_loss(a, b, window, mode, _symmetric(case)))


def _peak_memory_mb(run):
    if DEVICE != "cuda":
        return None
    _sync()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    _sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@pytest.mark.parametrize("case,provider,dtype,mode", list(_params()))
def test_loss(benchmark, case, provider, dtype, mode):
    window, window_mode, rounds = CASES[case][1], CASES[case][2], CASES[case][5]
    shape = _shape(case)
    loss_fn = _loss(provider, window, window_mode, _symmetric(case))
    feat_a, feat_b = _features(case, dtype)

    def leaves():
        return feat_a.detach().requires_grad_(), feat_b.detach().requires_grad_()

    def forward():
        a, b = leaves()
        loss = loss_fn(a, b)
        _sync()
        return loss

    def full():
        loss = forward()
        loss.backward()
        _sync()

    def backward_setup():
        return (forward(),), {}

    def backward(loss):
        loss.backward()
        _sync()

    # Correct first: the loss against the chunked reference, once per case, provider and dtype.
    got = float(forward().detach())
    expected = _expected_loss(case, dtype)
    assert abs(got - expected) <= 1e-4 * max(1.0, abs(expected)), (got, expected)

    peak = _peak_memory_mb(full if mode != "forward" else forward)
    benchmark.group = f"{case}-{mode}"
    benchmark.extra_info.update(
        case=case, symmetric=_symmetric(case), provider=provider, dtype=str(dtype).replace("torch.", ""), mode=mode, shape=list(shape),
        window=window, window_mode=window_mode, device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        peak_memory_mb=peak, flops=dense_flops(shape) if window is None else None,
    )
    if mode == "backward":
        benchmark.pedantic(backward, setup=backward_setup, rounds=rounds, warmup_rounds=1)
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
        peak_memory_mb=info["peak_memory_mb"], flops=info["flops"],
    )
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
