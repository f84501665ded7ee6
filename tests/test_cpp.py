"""The C++ CPU backend beyond the shared conformance suite: sizes against the tiles, every kernel
variant, determinism, torch.compile, the ops' own checks, and a property test over random problems."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import salign_kernels as sk
from salign_kernels import reference
from helpers import GRAD_TOLERANCE, assert_same_matches, make_features, make_mask, values_at

pytestmark = pytest.mark.skipif(not sk.backends()["cpp"], reason="the C++ extension is not built")


def compare(shape, window=None, mode="sliding", masked=True, dtype=torch.float32, seed=0, symmetric=False, normalize=True):
    """Loss values, matches and both gradients of cpp against the reference for one problem."""
    a, b = make_features(shape, dtype, seed=seed)
    masks = dict(mask_a=make_mask(shape, 0.85, seed + 1), mask_b=make_mask(shape, 0.75, seed + 2)) if masked else {}
    masks["normalize"] = normalize
    got = sk.window_match(a, b, window, mode=mode, backend="cpp", **masks) if window else sk.dense_match(a, b, backend="cpp", **masks)
    want = reference.window_match(a, b, window, mode, masks.get("mask_a"), masks.get("mask_b"), normalize)
    assert_same_matches(got, want, a, b, normalize)
    grads = []
    for backend in ("cpp", "reference"):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        loss = sk.local_alignment_loss(x, y, window=window, window_mode=mode, symmetric=symmetric, reduction="none", backend=backend, **masks)
        upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed))
        grads.append(torch.autograd.grad((loss * upstream).sum(), (x, y)))
    atol, rtol = GRAD_TOLERANCE[dtype]
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)


@pytest.mark.parametrize(
    "shape",
    [
        (1, 1, 1, 1),
        (1, 3, 1, 97),   # 1 x N, prime
        (1, 3, 97, 1),   # N x 1
        (2, 7, 13, 11),  # primes: neither rows nor candidates fill a tile
        (3, 5, 17, 23),  # N = 391: several panels and a ragged last one
        (32, 4, 5, 5),   # many samples
        (2, 300, 9, 7),  # wide features
        (2, 1, 16, 16),  # one channel
    ],
)
@pytest.mark.parametrize("symmetric", [False, True])
def test_dense_sizes_against_the_tiles(shape, symmetric):
    # One normalised channel makes every cosine +-1: exact ties, which rounding turns into
    # near-ties that may break either way; raw products keep the maximum unique.
    compare(shape, symmetric=symmetric, seed=sum(shape), normalize=shape[1] > 1)


@pytest.mark.parametrize("shape,window,mode", [
    ((2, 5, 13, 11), 5, "sliding"),
    ((1, 9, 1, 31), 7, "sliding"),
    ((1, 9, 31, 1), 7, "partition"),
    ((2, 300, 7, 9), 3, "sliding"),
    ((2, 3, 13, 11), 6, "partition"),
    ((2, 3, 13, 11), 13, "partition"),
])
def test_window_sizes(shape, window, mode):
    compare(shape, window, mode, seed=window)


# --- the window kernels against the vector width (16 float lanes with AVX-512) and the blocking ----
# Sliding: queries in lanes along w, blocks of up to 8 query rows, offsets dx in chunks of at most
# 7. Partition: a tile's queries in lanes, candidates in groups of 9, 6 or 12.


def compare_window(shape, window, mode, dtype=torch.float32, seed=0, normalize=True):
    """Matches of cpp against the reference (near-ties may break either way), and the gradients
    of cpp's values against those of the similarities at cpp's own choice."""
    a, b = make_features(shape, dtype, seed=seed)
    masks = dict(mask_a=make_mask(shape, 0.85, seed + 1), mask_b=make_mask(shape, 0.75, seed + 2))
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    got = sk.window_match(x, y, window, mode=mode, normalize=normalize, backend="cpp", **masks)
    want = reference.window_match(a, b, window, mode, masks["mask_a"], masks["mask_b"], normalize)
    assert_same_matches((got[0].detach(), got[1]), want, a, b, normalize)
    upstream = torch.rand(got[0].shape, generator=torch.Generator().manual_seed(seed), dtype=got[0].dtype)
    grads = torch.autograd.grad((got[0] * upstream).sum(), (x, y))
    x2, y2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    want_grads = torch.autograd.grad((values_at(x2, y2, got[1], normalize) * upstream).sum(), (x2, y2))
    atol, rtol = GRAD_TOLERANCE[dtype]
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)

SLIDING_SIZES = [
    ((2, 3, 5, 1), 3),          # W = 1: one lane of 16
    ((1, 4, 9, 15), 5),         # one segment, not full
    ((2, 5, 7, 16), 7),         # one full segment
    ((1, 3, 6, 17), 7),         # a second segment of one lane
    ((1, 6, 5, 33), 3),         # three segments
    ((1, 4, 13, 31), 9),        # primes; 9 offsets: two chunks (5 + 4)
    ((1, 3, 11, 37), 15),       # 15 offsets: three chunks of 5
    ((1, 2, 3, 29), 29),        # the window spans the whole row
    ((2, 3, 17, 3), 17),        # W smaller than the window, the window spans every column
    ((1, 3, 2, 7), 1),          # a window of one voxel
    ((1, 2, 23, 19), 11),       # 11 offsets: 6 + 5, rows blocks of 4 with a ragged last block
    ((3, 70, 9, 18), 5),        # wide features
]


@pytest.mark.parametrize("shape,window", SLIDING_SIZES)
def test_sliding_sizes_against_the_blocking(shape, window):
    compare_window(shape, window, "sliding", seed=sum(shape) + window)


SLIDING_SIZES_3D = [
    ((1, 4, 3, 5, 17), 3),
    ((2, 3, 5, 4, 16), (5, 3, 7)),
    ((1, 3, 4, 6, 33), (3, 5, 3)),
    ((1, 2, 7, 3, 2), 7),           # the window covers the volume on every axis
    ((1, 3, 2, 9, 1), (1, 9, 1)),   # columns
    ((1, 5, 6, 2, 20), (3, 1, 9)),  # depth and width only
    ((2, 4, 9, 7, 5), (9, 3, 3)),   # deep windows: depth radius past the volume
]


@pytest.mark.parametrize("shape,window", SLIDING_SIZES_3D)
def test_sliding_volumes_against_the_blocking(shape, window):
    compare_window(shape, window, "sliding", seed=sum(shape))


PARTITION_SIZES = [
    ((1, 4, 17, 33), (5, 7)),      # ragged in both axes
    ((2, 3, 16, 31), 15),          # 225-voxel tiles, a ragged last row and column of tiles
    ((1, 3, 4, 37), (4, 37)),      # one tile per row band, wider than the lanes
    ((2, 5, 9, 1), 4),             # W = 1
    ((1, 3, 5, 6), (5, 6)),        # one tile: dense matching
    ((1, 2, 33, 17), (2, 17)),     # 34-voxel tiles
    ((2, 70, 8, 8), 3),            # wide features
]


@pytest.mark.parametrize("shape,window", PARTITION_SIZES)
def test_partition_sizes_against_the_blocking(shape, window):
    compare_window(shape, window, "partition", seed=sum(shape))


PARTITION_SIZES_3D = [
    ((1, 3, 5, 7, 17), (2, 3, 16)),  # ragged on every axis
    ((2, 4, 4, 4, 4), 4),            # one tile per sample
    ((1, 3, 7, 5, 3), (3, 5, 1)),
    ((1, 2, 6, 6, 6), (6, 1, 6)),
]


@pytest.mark.parametrize("shape,window", PARTITION_SIZES_3D)
def test_partition_volumes_against_the_blocking(shape, window):
    compare_window(shape, window, "partition", seed=sum(shape))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,window,mode", [
    ((2, 9, 7, 33), 7, "sliding"),
    ((1, 5, 3, 6, 19), (3, 3, 5), "sliding"),
    ((2, 7, 17, 18), 15, "partition"),
    ((1, 4, 5, 6, 17), (2, 3, 8), "partition"),
])
def test_window_dtypes(dtype, shape, window, mode):
    compare_window(shape, window, mode, dtype=dtype, seed=7)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape,window,mode", [
    ((2, 4, 12, 35), 5, "sliding"),
    ((2, 3, 4, 9, 18), (3, 5, 3), "sliding"),
    ((2, 4, 12, 35), (4, 15), "partition"),
    ((2, 3, 4, 9, 18), (2, 3, 9), "partition"),
])
def test_masks_that_remove_whole_rows_and_tiles(normalize, shape, window, mode):
    a, b = make_features(shape, seed=3)
    spatial = shape[2:]
    mask_a = make_mask(shape, 0.9, 5)
    mask_b = make_mask(shape, 0.8, 6)
    mask_a[0, ..., 1:4, :] = False     # whole query rows (every row block of the first 4 rows)
    mask_b[0, ..., 5:7, :] = False     # whole candidate rows
    mask_b[1, ..., :, :spatial[-1] // 2] = False  # whole tiles and half of every row
    if len(spatial) == 3:
        mask_b[1, 1] = False           # a whole candidate plane
    got = sk.window_match(a, b, window, mode=mode, mask_a=mask_a, mask_b=mask_b, normalize=normalize, backend="cpp")
    want = reference.window_match(a, b, window, mode, mask_a, mask_b, normalize)
    assert_same_matches(got, want, a, b, normalize)
    assert (got[1][~mask_a] == -1).all()


def expected_non_finite(a, b, window, mode, mask_a, mask_b, normalize):
    """Where the resolution rules of non-finite input decide (a non-finite query takes its first
    candidate, else the first non-finite candidate wins, both with NaN): {(sample, p): index}."""
    from spec_oracle import candidate_set
    import itertools

    spatial = tuple(a.shape[2:])
    prepared = [reference.prepare_features(x.double(), normalize).flatten(2) for x in (a, b)]
    bad_a, bad_b = (~torch.isfinite(x).all(dim=1) for x in prepared)  # (B, N)
    out = {}
    for s in range(a.shape[0]):
        for p, position in enumerate(itertools.product(*(range(n) for n in spatial))):
            if not mask_a.flatten(1)[s, p]:
                continue
            cands = [q for q in candidate_set(position, spatial, window, mode) if mask_b.flatten(1)[s, q]]
            if not cands:
                continue
            if bad_a[s, p]:
                out[(s, p)] = cands[0]
            elif any(bad_b[s, q] for q in cands):
                out[(s, p)] = next(q for q in cands if bad_b[s, q])
    return out


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("shape,window,mode", [
    ((2, 3, 9, 37), 7, "sliding"),
    ((1, 3, 4, 5, 18), (3, 3, 5), "sliding"),
    ((2, 3, 9, 37), (4, 15), "partition"),
    ((1, 3, 4, 5, 18), (2, 3, 7), "partition"),
])
def test_non_finite_values_resolve_as_specified(normalize, bad, shape, window, mode):
    # Non-finite voxels in queries (the scalar resolution of the whole query) and candidates (the
    # vector path skips them), at borders, next to each other, and under a mask (ignored). With
    # normalisation their x_hat is NaN: a non-finite query takes its first candidate, else the
    # window's first non-finite candidate wins, both NaN. Without it the raw products follow IEEE
    # (+-inf or NaN), exactly as the reference's.
    a, b = make_features(shape, seed=12)
    spatial = shape[2:]
    mask_a, mask_b = make_mask(shape, 0.9, 1), make_mask(shape, 0.85, 2)
    last = tuple(n - 1 for n in spatial)
    middle = tuple(n // 2 for n in spatial)
    a[(0, 1) + middle] = bad
    a[(1 % shape[0], 0) + last] = bad
    b[(0, 2) + middle] = bad
    b[(0, 0) + tuple(min(n - 1, 1) for n in spatial)] = bad
    b[(0, 1) + middle[:-1] + (min(spatial[-1] - 1, middle[-1] + 1),)] = bad
    b[(1 % shape[0], 0) + last] = bad
    masked_bad = (0, 0) + tuple(min(n - 1, 2) for n in spatial)
    b[masked_bad] = bad
    mask_b[(0,) + masked_bad[2:]] = False
    values, indices = sk.window_match(a, b, window, mode=mode, mask_a=mask_a, mask_b=mask_b, normalize=normalize, backend="cpp")
    if not normalize:
        want = reference.window_match(a, b, window, mode, mask_a, mask_b, normalize)
        assert torch.equal(indices, want[1])
        nonfinite = ~torch.isfinite(want[0])
        assert nonfinite.any(), "the case must exercise the non-finite rules"
        assert torch.equal(nonfinite, ~torch.isfinite(values))
        torch.testing.assert_close(values, want[0], atol=2e-5, rtol=2e-5, equal_nan=True)
        return
    window_t = (window,) * len(spatial) if isinstance(window, int) else window
    decided = expected_non_finite(a, b, window_t, mode, mask_a, mask_b, normalize)
    assert decided, "the case must exercise the non-finite rules"
    flat_values, flat_indices = values.flatten(1), indices.flatten(1)
    for (s, p), q in decided.items():
        assert flat_indices[s, p] == q and torch.isnan(flat_values[s, p]), (s, p)
    # Everything else is ordinary matching.
    rest = torch.ones_like(flat_indices, dtype=torch.bool)
    for s, p in decided:
        rest[s, p] = False
    want = reference.window_match(a, b, window, mode, mask_a, mask_b, normalize)
    got_rest = (values.flatten(1)[rest], indices.flatten(1)[rest])
    want_rest = (want[0].flatten(1)[rest], want[1].flatten(1)[rest])
    assert torch.equal(got_rest[1] < 0, want_rest[1] < 0)
    torch.testing.assert_close(got_rest[0], want_rest[0], atol=2e-5, rtol=2e-5, equal_nan=True)


@pytest.mark.parametrize("shape,window,mode", [
    ((1, 3, 6, 21), 5, "sliding"),
    ((1, 2, 3, 4, 18), 3, "sliding"),
    ((1, 3, 6, 21), (4, 8), "partition"),
])
def test_every_similarity_minus_infinity_takes_the_first_candidate(shape, window, mode):
    # Without normalisation, huge opposite features overflow every product to -inf: the first
    # candidate in flat order, with value -inf.
    a = torch.full(shape, 1e30)
    b = torch.full(shape, -1e30)
    mask_b = make_mask(shape, 0.6, 3)
    values, indices = sk.window_match(a, b, window, mode=mode, mask_b=mask_b, normalize=False, backend="cpp")
    from spec_oracle import candidate_set
    import itertools

    spatial = shape[2:]
    window_t = (window,) * len(spatial) if isinstance(window, int) else window
    for p, position in enumerate(itertools.product(*(range(n) for n in spatial))):
        cands = [q for q in candidate_set(position, spatial, window_t, mode) if mask_b.flatten(1)[0, q]]
        if cands:
            assert indices.flatten()[p] == cands[0] and values.flatten()[p] == float("-inf")
        else:
            assert indices.flatten()[p] == -1 and values.flatten()[p] == 0


@pytest.mark.parametrize("shape,window,mode", [
    ((1, 8, 37, 35), 7, "sliding"),
    ((1, 4, 9, 10, 20), (3, 5, 3), "sliding"),
    ((1, 8, 37, 35), (6, 15), "partition"),
    ((1, 4, 9, 10, 20), (2, 4, 7), "partition"),
])
def test_window_forward_is_deterministic_across_thread_counts(shape, window, mode):
    # One sample: the sliding kernel splits it into slabs and bands by the thread count.
    a, b = make_features(shape, seed=4)
    mask_b = make_mask(shape, 0.8, 5)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 5):
            torch.set_num_threads(n)
            results.append(sk.window_match(a, b, window, mode=mode, mask_b=mask_b, backend="cpp"))
    finally:
        torch.set_num_threads(threads)
    for values, indices in results[1:]:
        assert torch.equal(values, results[0][0]) and torch.equal(indices, results[0][1])


def test_wide_in_plane_windows_are_exactly_the_per_slice_result():
    # Beyond test_backends' small maps: several lane segments, offset chunks and row blocks.
    B, C, D, H, W = 1, 5, 3, 11, 37
    a, b = make_features((B, C, D, H, W), seed=2)
    mask_b = make_mask((B, C, D, H, W), 0.8, 4)
    slices = lambda x: x.transpose(1, 2).reshape(B * D, C, H, W)  # noqa: E731
    for k in (3, 9, 11):
        values, indices = sk.window_match(a, b, (1, k, k), mask_b=mask_b, backend="cpp")
        want_values, want_indices = sk.window_match(slices(a), slices(b), k, mask_b=mask_b.reshape(B * D, H, W), backend="cpp")
        offset = (torch.arange(D) * H * W).view(1, D, 1, 1)
        want_indices = want_indices.view(B, D, H, W)
        assert torch.equal(indices, torch.where(want_indices >= 0, want_indices + offset, -1))
        assert torch.equal(values, want_values.view(B, D, H, W))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dense_dtypes_on_several_panels(dtype):
    compare((2, 19, 11, 13), dtype=dtype, symmetric=True, seed=3)


def test_many_panels_and_query_tiles():
    # 4096 candidates and queries: several L2 blocks of panels and several tasks per sample.
    compare((2, 16, 64, 64), masked=True, symmetric=True, seed=5)


VARIANT_SCRIPT = """
import torch, salign_kernels as sk
from salign_kernels.ops import cpp as cpu
gen = torch.Generator().manual_seed(0)
a, b = (torch.randn(2, 21, 13, 17, generator=gen, dtype=torch.float64).to(torch.{dtype}) for _ in range(2))
mask = torch.rand(2, 13, 17, generator=gen) > 0.3
out = [cpu.capability()]
for window, mode in [(None, "sliding"), (5, "sliding"), (4, "partition")]:
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss = sk.local_alignment_loss(x, y, window=window, window_mode=mode, symmetric=True, mask_b=mask, backend="cpp")
    loss.backward()
    out.append([loss.item(), x.grad.double().sum().item(), y.grad.double().abs().sum().item()])
print(out)
"""


def runnable_variants(variants):
    """The variants up to the one PyTorch picks for this CPU by itself. PyTorch takes a higher
    ATEN_CPU_CAPABILITY on trust, and its own kernels of that level then stop the process with
    SIGILL (seen: AVX512 sign_kernel on an AVX2 machine), before ours are reached."""
    order = ["DEFAULT", "AVX2", "AVX512"]
    native = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                            env={k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"},
                            capture_output=True, text=True, timeout=120).stdout.strip()
    limit = order.index(native) if native in order else 0
    return {env: name for env, name in variants.items() if order.index(name) <= limit}


def run_variant(capability: str, dtype: str = "float32"):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    result = subprocess.run(
        [sys.executable, "-c", VARIANT_SCRIPT.format(dtype=dtype)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return eval(result.stdout)  # a list of floats and one string, printed by the script above


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_every_kernel_variant_gives_the_same_answer(dtype):
    """The DEFAULT, AVX2 and AVX512 builds of the kernels agree (each where this CPU runs it)."""
    supported = {"default": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512"}
    results = {}
    for env_name, name in runnable_variants(supported).items():
        out = run_variant(env_name, dtype)
        if out[0] != name:  # this CPU cannot run that variant; PyTorch fell back to a lower one
            continue
        results[name] = out[1:]
    assert "DEFAULT" in results
    baseline = results.pop("DEFAULT")
    for name, values in results.items():
        for got, want in zip(values, baseline):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6), name


WINDOW_VARIANT_SCRIPT = """
import sys, torch, salign_kernels as sk
from salign_kernels.ops import cpp as cpu
gen = torch.Generator().manual_seed(1)
cases = [((2, 19, 13, 37), 7, "sliding"), ((1, 5, 9, 23), 15, "sliding"), ((2, 19, 13, 37), (15, 4), "partition"),
         ((1, 6, 5, 7, 33), (3, 5, 3), "sliding"), ((1, 6, 5, 7, 33), (2, 3, 16), "partition")]
out = {"capability": cpu.capability(), "cases": []}
for shape, window, mode in cases:
    a, b = (torch.randn(shape, generator=gen, dtype=torch.float64).to(torch.DTYPE) for _ in range(2))
    mask = torch.rand(shape[0], *shape[2:], generator=gen) > 0.25
    values, indices = sk.window_match(a, b, window, mode=mode, mask_b=mask, backend="cpp")
    out["cases"].append((a, b, values, indices))
torch.save(out, sys.argv[1])
"""


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_every_kernel_variant_matches_windows_alike(dtype, tmp_path):
    """The DEFAULT, AVX2 and AVX512 window kernels (different vector widths, so different lane
    segments and blocks) find the same matches, up to near-ties (each where this CPU runs it)."""
    results = {}
    for env_name in runnable_variants({"default": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512"}):
        path = tmp_path / f"{env_name}.pt"
        env = dict(os.environ, ATEN_CPU_CAPABILITY=env_name)
        done = subprocess.run([sys.executable, "-c", WINDOW_VARIANT_SCRIPT.replace("DTYPE", dtype), str(path)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        out = torch.load(path)
        if out["capability"] == env_name.upper():
            results[out["capability"]] = out["cases"]
    assert "DEFAULT" in results
    baseline = results.pop("DEFAULT")
    for name, cases in results.items():
        for (a, b, values, indices), (_, _, want_values, want_indices) in zip(cases, baseline):
            assert_same_matches((values, indices), (want_values, want_indices), a.double(), b.double(), atol=1e-5)


@pytest.mark.parametrize("window,mode", [(None, "sliding"), (5, "sliding"), (3, "partition")])
def test_backward_is_deterministic_across_thread_counts(window, mode):
    a, b = make_features((4, 8, 16, 16), seed=2)
    # Few distinct candidates: many queries choose the same one, so the scatter sums are long.
    b = b[:, :, :2, :2].repeat(1, 1, 8, 8)
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
            loss = sk.local_alignment_loss(x, y, window=window, window_mode=mode, symmetric=True, backend="cpp")
            grads.append(torch.autograd.grad(loss, (x, y)))
    finally:
        torch.set_num_threads(threads)
    for other in grads[1:]:
        assert torch.equal(other[0], grads[0][0]) and torch.equal(other[1], grads[0][1])


@pytest.mark.parametrize("window,mode", [(None, "sliding"), (3, "sliding"), (4, "partition")])
def test_torch_compile_full_graph_training_step(window, mode):
    """The loss compiles with no graph break; AOTAutograd also compiles its backward."""
    torch._dynamo.reset()
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    criterion = sk.LocalAlignmentLoss(window=window, window_mode=mode, symmetric=True, backend="cpp")

    def forward(x, y, mask):
        return criterion(conv(x), conv(y), mask_b=mask)

    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    x, y = torch.randn(2, 3, 9, 11), torch.randn(2, 3, 9, 11)
    mask = make_mask((2, 3, 9, 11), 0.7, 3)
    results = []
    for fn in (compiled, forward):
        conv.zero_grad()
        loss = fn(x, y, mask)
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in conv.parameters()])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("window,mode", [(None, "sliding"), (3, "partition")])
def test_ops_trace_with_fake_tensors(window, mode):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a = torch.randn(2, 5, 6, 7, dtype=torch.bfloat16, requires_grad=True)
        b = torch.randn(2, 5, 6, 7, dtype=torch.bfloat16, requires_grad=True)
        values, indices = (sk.window_match(a, b, window, mode=mode, backend="cpp") if window
                           else sk.dense_match(a, b, backend="cpp"))
        assert values.shape == (2, 6, 7) and values.dtype == torch.float32 and indices.dtype == torch.int64
        loss = sk.local_alignment_loss(a, b, window=window, window_mode=mode, symmetric=True, backend="cpp")
        grad_a, _ = torch.autograd.grad(loss, (a, b))
        assert grad_a.shape == a.shape and grad_a.dtype == torch.bfloat16


# --- the ops' own checks (the public API checks first; these guard direct calls) -----------------

OPS = torch.ops.salign_kernels


def op_args(**override):
    args = dict(feat_a=torch.randn(2, 3, 4, 5), feat_b=torch.randn(2, 3, 4, 5), mask_a=None, mask_b=None,
                window=[], mode=0, normalize=True)
    args.update(override)
    return list(args.values())


@pytest.mark.parametrize(
    "override,error,message",
    [
        (dict(feat_a=torch.randn(2, 3, 4)), ValueError, r"feat_a must be \(B, C, H, W\) or \(B, C, D, H, W\); got 3 dimensions"),
        (dict(feat_a=torch.randn(1, 2, 3, 4, 5, 6), feat_b=torch.randn(1, 2, 3, 4, 5, 6)), ValueError, r"got 6 dimensions"),
        (dict(feat_b=torch.randn(2, 3, 4, 6)), ValueError, r"feat_a and feat_b must have the same shape"),
        (dict(feat_b=torch.randn(2, 3, 4, 5, dtype=torch.float64)), TypeError, r"feat_a and feat_b must have the same dtype"),
        (dict(feat_a=torch.zeros(2, 3, 4, 5, dtype=torch.int32), feat_b=torch.zeros(2, 3, 4, 5, dtype=torch.int32)), TypeError, r"feat_a must be float32, float64, float16 or bfloat16"),
        (dict(feat_a=torch.randn(2, 0, 4, 5), feat_b=torch.randn(2, 0, 4, 5)), ValueError, r"feat_a must not be empty"),
        (dict(mask_a=torch.ones(2, 4, 5)), TypeError, r"mask_a must be bool; got Float"),
        (dict(mask_b=torch.ones(2, 5, 4, dtype=torch.bool)), ValueError, r"mask_b must have shape \(B, \*spatial\)"),
        (dict(window=[-1, 3]), ValueError, r"window sizes must lie in \[1, 5\]; got \[-1, 3\]"),
        (dict(window=[3, 6]), ValueError, r"window sizes must lie in \[1, 5\]; got \[3, 6\]"),
        (dict(window=[3]), ValueError, r"window must have one size per spatial axis \(2\); got \[3\]"),
        (dict(window=[1, 3, 3]), ValueError, r"window must have one size per spatial axis \(2\)"),
        (dict(window=[3, 2], mode=0), ValueError, r"window sizes must be odd in sliding mode; got \[3, 2\]"),
        (dict(window=[3, 3], mode=2), ValueError, r"mode must be 0 \(sliding\) or 1 \(partition\); got 2"),
    ],
)
def test_op_checks(override, error, message):
    with pytest.raises(error, match=message):
        OPS.match(*op_args(**override))


def test_sliding_op_takes_maps_whose_offsets_fit_32_bits():
    # 46341^2 > 2^31 voxels, as a broadcast view (no memory): the check comes before any kernel.
    huge = torch.zeros(1, 1, 1, 1).expand(1, 1, 46341, 46341)
    with pytest.raises(ValueError, match=r"sliding windows on the CPU take maps of at most 2\^31 - 1 voxels"):
        OPS.match(huge, huge, None, None, [3, 3], 0, True)


def test_symmetric_op_is_dense_only():
    with pytest.raises(ValueError, match=r"match_symmetric fuses dense matching only"):
        OPS.match_symmetric(*op_args(window=[3, 3], mode=1))


@pytest.mark.parametrize(
    "override,error,message",
    [
        (dict(indices=torch.full((2, 4, 5), 20)), ValueError, r"indices must lie in \[-1, N = 20\)"),
        (dict(indices=torch.full((2, 4, 5), -2)), ValueError, r"indices must lie in"),
        (dict(indices=torch.zeros(2, 4, 5, dtype=torch.int32)), TypeError, r"indices must be int64"),
        (dict(grad_values=torch.zeros(2, 4)), ValueError, r"grad_values must have shape"),
        (dict(grad_values=torch.zeros(2, 4, 5, dtype=torch.float64)), TypeError, r"grad_values must be Float"),
        (dict(feat_b=torch.randn(2, 3, 5, 4)), ValueError, r"feat_a and feat_b must have the same shape"),
    ],
)
def test_backward_op_checks(override, error, message):
    args = dict(grad_values=torch.zeros(2, 4, 5), feat_a=torch.randn(2, 3, 4, 5), feat_b=torch.randn(2, 3, 4, 5),
                indices=torch.zeros(2, 4, 5, dtype=torch.long), normalize=True)
    args.update(override)
    with pytest.raises(error, match=message):
        OPS.match_backward(*args.values())


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_gradients_come_back_in_the_features_layout(layout):
    from helpers import as_layout

    a, b = (as_layout(x, layout).requires_grad_() for x in make_features((2, 6, 5, 7)))
    loss = sk.local_alignment_loss(a, b, symmetric=True, backend="cpp")
    grad_a, grad_b = torch.autograd.grad(loss, (a, b))
    if layout == "channels_last":  # no layout copy on the way back
        assert grad_a.is_contiguous(memory_format=torch.channels_last)
        assert grad_b.is_contiguous(memory_format=torch.channels_last)
    want = torch.autograd.grad(sk.local_alignment_loss(a, b, symmetric=True, backend="reference"), (a, b))
    torch.testing.assert_close(grad_a, want[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad_b, want[1], atol=1e-5, rtol=1e-4)


def test_tiny_norms_follow_the_clamp():
    """Pixels with ||x|| < 1e-12 are scaled by 1/eps, and their gradient skips the norm, as F.normalize."""
    a, b = make_features((1, 4, 3, 3), torch.float64, seed=3)
    a[0, :, 1, 1] *= 1e-14
    b[0, :, 2, 0] *= 1e-14
    a.requires_grad_()
    b.requires_grad_()
    for backend in ("cpp", "reference"):
        loss = sk.local_alignment_loss(a, b, symmetric=True, normalize=True, backend=backend, reduction="sum")
        grads = torch.autograd.grad(loss, (a, b))
        if backend == "cpp":
            got = (loss, *grads)
    for g, w in zip(got, (loss, *grads)):
        torch.testing.assert_close(g, w)


# --- property test --------------------------------------------------------------------------------


@st.composite
def problems(draw):
    B = draw(st.integers(1, 3))
    C = draw(st.integers(1, 40))
    H = draw(st.integers(1, 12))
    W = draw(st.integers(1, 12))
    kind = draw(st.sampled_from(["dense", "sliding", "partition"]))
    window = None
    if kind == "sliding":
        window = draw(st.sampled_from([k for k in (1, 3, 5, 7, 9, 11) if k <= max(H, W)]))
    elif kind == "partition":
        window = draw(st.integers(1, max(H, W)))
    keep_a = draw(st.sampled_from([1.0, 0.7, 0.2, 0.0]))
    keep_b = draw(st.sampled_from([1.0, 0.7, 0.2, 0.0]))
    return dict(shape=(B, C, H, W), window=window, mode="partition" if kind == "partition" else "sliding",
                keep=(keep_a, keep_b), normalize=draw(st.booleans()), seed=draw(st.integers(0, 10_000)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_property_matches_the_reference(problem):
    shape, window, mode = problem["shape"], problem["window"], problem["mode"]
    a, b = make_features(shape, seed=problem["seed"])
    mask_a = make_mask(shape, problem["keep"][0], problem["seed"] + 1)
    mask_b = make_mask(shape, problem["keep"][1], problem["seed"] + 2)
    kw = dict(mask_a=mask_a, mask_b=mask_b, normalize=problem["normalize"])
    got = (sk.window_match(a, b, window, mode=mode, backend="cpp", **kw) if window else sk.dense_match(a, b, backend="cpp", **kw))
    want = reference.window_match(a, b, window, mode, mask_a, mask_b, problem["normalize"])
    assert_same_matches(got, want, a, b, problem["normalize"], atol=1e-4)


@pytest.mark.skipif(shutil.which("objdump") is None or platform.machine() != "x86_64", reason="needs objdump on x86-64")
def test_only_the_avx_variants_contain_avx_instructions():
    """The DEFAULT kernels must run on any x86-64 CPU: no function outside the AVX2/AVX512 namespaces
    may use ymm/zmm registers (an inline function the linker took from the AVX-512 unit would)."""
    import salign_kernels._C as extension

    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", extension.__file__],
                             capture_output=True, text=True, check=True).stdout
    function, offenders = None, set()
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
        elif function and re.search(r"%[yz]mm\d", line):
            if not re.search(r"(salign|at::vec)::AVX(2|512)::|\[clone \.", function):  # IPA clones are TU-local
                offenders.add(function)
    assert not offenders, sorted(offenders)[:10]


def test_a_variant_this_cpu_cannot_run_is_never_chosen():
    """Asked for AVX512 (ATEN_CPU_CAPABILITY) on a CPU without it, the kernels use the best variant
    the CPU executes instead of stopping the process with SIGILL."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx512")
    done = subprocess.run([sys.executable, "-c", "from salign_kernels.ops import cpp; print(cpp.capability())"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    runnable = runnable_variants({"default": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512"}).values()
    assert done.stdout.strip() == max(runnable, key=["DEFAULT", "AVX2", "AVX512"].index)
