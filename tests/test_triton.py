"""Triton-specific tests: tile edge cases, half precision, the deterministic backward, torch.compile,
the ops' own argument checks, availability; and GPU-only checks (tensor-core bf16, autotuned tiles,
large maps, memory).

Without a CUDA device the kernels run on CPU tensors through Triton's interpreter (set up by
``tests/conftest.py``), on small shapes; tests marked ``gpu`` are skipped. With one, every test
parametrised by ``device`` runs on CUDA tensors as well.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import salign_kernels as sk
from salign_kernels import _backend, reference
from salign_kernels._matching import WINDOW_MODE_CODES, matching_of
from helpers import GRAD_TOLERANCE, VALUE_TOLERANCE, as_layout, assert_same_matches, make_features, make_mask, values_at


def _devices():
    devices = []
    for device in ("cpu", "cuda"):
        try:
            sk.resolve_backend("triton", device)
        except sk.BackendUnavailableError:
            continue
        devices.append(device)
    return devices


DEVICES = _devices()
pytestmark = pytest.mark.skipif(not DEVICES, reason="the Triton backend runs on no device here")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


if DEVICES:  # Triton imports and runs here: a kernel of the tests' own
    import triton
    import triton.language as tl

    from salign_kernels.ops.triton._argmax import NO_HIT, tile_argmax_compiled, tile_argmax_interpreted

    @triton.jit
    def _tile_argmax_probe(s_ptr, top_ptr, arg_ptr, COMPILED: tl.constexpr, R: tl.constexpr, K: tl.constexpr):
        rows = tl.arange(0, R)
        cols = tl.arange(0, K)
        s = tl.load(s_ptr + rows[:, None] * K + cols[None, :])
        if COMPILED:
            top, arg = tile_argmax_compiled(s, cols[None, :])
        else:
            top, arg = tile_argmax_interpreted(s, cols[None, :])
        tl.store(top_ptr + rows, top)
        tl.store(arg_ptr + rows, arg)


@pytest.fixture(params=DEVICES or ["none"])
def device(request):
    return request.param


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _match(backend, a, b, window, mode, **kw):
    if backend == "reference":
        return reference.window_match(a, b, window, mode, kw.get("mask_a"), kw.get("mask_b"), kw.get("normalize", True))
    if window is None:
        return sk.dense_match(a, b, backend=backend, **kw)
    return sk.window_match(a, b, window, mode=mode, backend=backend, **kw)


def _values_and_grads(backend, a, b, window, mode, upstream, **kw):
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    values, indices = _match(backend, a, b, window, mode, **kw)
    grads = torch.autograd.grad((values * upstream).sum(), (a, b))
    return (values.detach(), indices), grads


def check_against_reference(device, shape, window=None, mode="sliding", dtype=torch.float32, masked=False,
                            normalize=True, seed=0):
    """Triton on ``device`` against the reference on the same tensors: matches and both gradients."""
    a, b = make_features(shape, dtype, seed=seed, device=device)
    kw = dict(normalize=normalize)
    if masked:
        kw.update(mask_a=make_mask(shape, 0.8, seed + 1, device), mask_b=make_mask(shape, 0.6, seed + 2, device))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    upstream = torch.randn(shape[0], shape[2], shape[3], dtype=acc).to(device)
    got, got_grads = _values_and_grads("triton", a, b, window, mode, upstream, **kw)
    want, want_grads = _values_and_grads("reference", a, b, window, mode, upstream, **kw)
    assert got[0].dtype == want[0].dtype == acc
    assert_same_matches(
        tuple(t.cpu() for t in got), tuple(t.cpu() for t in want), a.cpu(), b.cpu(), normalize,
        atol=VALUE_TOLERANCE[dtype][0],
    )
    if not torch.equal(got[1], want[1]):
        # A near-tie broken the other way (checked above): the reference's gradient is that of its
        # own choice, so compare with the gradient of the choice the kernel made.
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        want_grads = torch.autograd.grad((values_at(x, y, got[1], normalize) * upstream).sum(), (x, y))
    atol, rtol = GRAD_TOLERANCE[dtype]
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)
    return got


# Shapes around the tiles: the interpreter's dense tiles are 32 x 32 pixels (16 in float64) with
# channel chunks of up to 128 (64-wide beyond); GPU tiles are 16 to 128 pixels.
TILE_EDGE_CASES = [
    # (B, C, H, W), window, mode
    ((1, 5, 7, 9), None, "sliding"),  # N = 63: two query tiles and two candidate tiles, both ragged
    ((2, 3, 1, 37), None, "sliding"),  # 1 x N, prime
    ((1, 17, 37, 1), None, "sliding"),  # N x 1, C not a power of two
    ((1, 130, 5, 7), None, "sliding"),  # C > 128: channels in chunks, queries reloaded per chunk
    ((1, 1, 1, 1), None, "sliding"),  # one pixel, one channel
    ((2, 33, 11, 13), 5, "sliding"),
    ((1, 130, 6, 7), 3, "sliding"),  # channel chunks in the window kernel and the backward
    ((1, 4, 9, 9), 9, "sliding"),  # the window covers the map
    ((1, 3, 37, 1), 3, "sliding"),
    ((1, 6, 11, 13), 4, "partition"),  # ragged edge tiles on both sides
    ((1, 3, 37, 1), 4, "partition"),
    ((2, 5, 9, 9), 9, "partition"),  # one tile: dense matching
]


@pytest.mark.parametrize("shape,window,mode", TILE_EDGE_CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_tile_edges(device, shape, window, mode, masked):
    check_against_reference(device, shape, window, mode, masked=masked, seed=sum(shape))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("window,mode", [(None, "sliding"), (5, "sliding"), (4, "partition")])
def test_dtypes_with_wide_channels(device, dtype, window, mode):
    # C = 40: a 64-wide tl.dot whose operands are half (bf16 cast to float32 under the interpreter).
    check_against_reference(device, (2, 40, 5, 9), window, mode, dtype=dtype, masked=True, seed=3)


def _check_symmetric(device, shape, masked, seed, dtype=torch.float32):
    from salign_kernels.ops import triton as backend

    a, b = make_features(shape, dtype, seed=seed, device=device)
    ma = make_mask(shape, 0.7, seed + 1, device) if masked else None
    mb = make_mask(shape, 0.6, seed + 2, device) if masked else None
    got = backend.match_symmetric(a, b, matching_of(a, None, "sliding", ma, mb, True))
    want = [reference.dense_match(a, b, ma, mb), reference.dense_match(b, a, mb, ma)]
    atol = VALUE_TOLERANCE[dtype][0]
    for (g, w), (x, y) in zip(zip(got, want), ((a, b), (b, a))):
        assert_same_matches(tuple(t.cpu() for t in g), tuple(t.cpu() for t in w), x.cpu(), y.cpu(), atol=atol)
    return a, b, ma, mb, got


@pytest.mark.parametrize("N", [20, 32, 37, 64, 97])  # one partial tile, full tiles only, full + ragged
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_dense_scan_seams(device, N, masked, normalize):
    # The dense scan's paths, each against the reference exactly: mask-free full tiles (with and
    # without the next tile's product in flight), the ragged last tile, a masked b, and the rows
    # left to the settle pass: a NaN similarity in a later tile than the row's finite maximum, a
    # non-finite query, a row whose every candidate is -inf, and a sample without any candidate.
    # Entries in {-1, 0, 1} make every product exact, so ties (repeated candidates in different
    # tiles) are exact too and their lowest index is checked, not approximated.
    gen = torch.Generator().manual_seed(N)
    a = torch.randint(-1, 2, (3, 4, 1, N), generator=gen).float()
    b = torch.randint(-1, 2, (3, 4, 1, N), generator=gen).float()
    b[:, :, :, N - 3] = b[:, :, :, 2]  # a tie across tiles: index 2 must win
    b[0, 1, 0, N - 1] = float("nan")  # the NaN similarity sits in the last tile
    a[1, :, 0, 3] = float("inf")  # non-finite queries
    a[2, 0, 0, 4] = float("nan")
    if not normalize:
        a[1, :, 0, 5] = 1.0
        b[1, 0, 0, :] = float("-inf")  # query 5 against every candidate: -inf
    mask_a = mask_b = None
    if masked:
        mask_a = torch.rand(3, 1, N, generator=gen) > 0.2
        mask_b = torch.rand(3, 1, N, generator=gen) > 0.3
        mask_b[2] = False  # no candidate at all: every query of sample 2 gets -1
        mask_b[0, 0, N - 1] = True
    want = reference.dense_match(a, b, mask_a, mask_b, normalize)
    got = sk.dense_match(a.to(device), b.to(device), mask_a=None if mask_a is None else mask_a.to(device),
                         mask_b=None if mask_b is None else mask_b.to(device), normalize=normalize, backend="triton")
    assert torch.equal(got[1].cpu(), want[1])
    torch.testing.assert_close(got[0].cpu(), want[0], equal_nan=True, atol=1e-6, rtol=1e-6)
    assert torch.isnan(want[0][0]).any()  # the NaN case is exercised, not masked away


@pytest.mark.parametrize("shape", [(1, 5, 7, 9), (2, 3, 1, 37), (1, 17, 37, 1), (1, 130, 5, 7), (1, 1, 1, 1)])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_symmetric_both_directions(device, shape, masked):
    # Both directions from one op: ragged tiles, masks on both sides (a query mask in one
    # direction is a candidate mask in the other).
    _check_symmetric(device, shape, masked, seed=sum(shape))


def test_fused_symmetric_agrees_with_two_passes(device, monkeypatch):
    from salign_kernels.ops import triton as backend

    shape = (2, 6, 9, 8)
    a, b, ma, mb, fused = _check_symmetric(device, shape, True, seed=7)
    b2 = b.clone()
    b2[0, :, 3, 3] = float("nan")  # NaN wins in both directions
    matching = matching_of(a, None, "sliding", ma, mb, True)
    monkeypatch.setattr(backend, "fuses_symmetric", lambda feat, m: False)  # two one-way ops instead
    two_pass = _backend.match_directions(backend, a, b, matching, symmetric=True)
    for (fv, fi), (tv, ti) in zip(fused, two_pass):  # the same scans: the same bits
        assert torch.equal(fv, tv) and torch.equal(fi, ti)
    monkeypatch.undo()
    for values, indices in backend.match_symmetric(a, b2, matching_of(a)):
        nan_rows = torch.isnan(values)
        assert nan_rows[0].any() and (indices[nan_rows] >= 0).all()
    # The b -> a NaNs: every query of b's first sample whose candidate set holds the NaN pixel.
    _, (values_ba, _) = backend.match_symmetric(a, b2, matching_of(a))
    assert torch.isnan(values_ba[0, 3, 3])


def test_feature_flags():
    from salign_kernels.ops.triton import _runtime

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # The interpreter computes tl.dot on bfloat16 wrongly: operands are cast to float32 there only.
    assert _runtime.feature_flags(torch.bfloat16, cpu, interpreted=True)["UPCAST"]
    assert not _runtime.feature_flags(torch.bfloat16, cuda, interpreted=False)["UPCAST"]
    assert not _runtime.feature_flags(torch.float16, cpu, interpreted=True)["UPCAST"]
    assert _runtime.feature_flags(torch.float64, cpu, interpreted=True)["IS_F64"]
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        # float32 without TF32: three TF32 products per tile by default (float32's accuracy).
        assert _runtime.feature_flags(torch.float32, cuda, interpreted=False)["PRECISION"] == "tf32x3"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert _runtime.feature_flags(torch.float32, cuda, interpreted=False)["PRECISION"] == "tf32"
        assert _runtime.feature_flags(torch.float32, cpu, interpreted=True)["PRECISION"] == "tf32x3"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    # An explicit choice wins over torch's switch; half operands are not affected by it.
    previous = sk.set_float32_precision("ieee")
    try:
        assert _runtime.feature_flags(torch.float32, cuda, interpreted=False)["PRECISION"] == "ieee"
        assert _runtime.feature_flags(torch.float16, cuda, interpreted=False)["PRECISION"] == "tf32"
        assert sk.get_float32_precision() == "ieee"
        with pytest.raises(ValueError, match=r"precision must be one of 'auto', 'tf32x3', 'ieee', 'tf32'; got 'fp16'"):
            sk.set_float32_precision("fp16")
        assert sk.get_float32_precision() == "ieee"
    finally:
        assert sk.set_float32_precision(previous) == "ieee"


@pytest.mark.parametrize("window,mode", [(None, "sliding"), (3, "sliding"), (3, "partition")])
def test_nan_wins_and_ties_keep_the_lowest_index(device, window, mode):
    a, b = make_features((1, 4, 6, 6), seed=12, device=device)
    b[:, :, 2, 3] = float("nan")
    values, indices = _match("triton", a, b, window, mode)
    want_values, want_indices = _match("reference", a, b, window, mode)
    nan_rows = torch.isnan(want_values)
    assert torch.equal(torch.isnan(values), nan_rows) and nan_rows.any()
    assert torch.equal(indices[nan_rows], want_indices[nan_rows])  # the NaN candidate itself
    torch.testing.assert_close(values[~nan_rows], want_values[~nan_rows], atol=2e-5, rtol=2e-5)
    # Exact duplicates among the candidates: the lowest index wins.
    b = torch.zeros_like(a)
    b[:, 0] = 1.0
    _, indices = _match("triton", a.abs(), b, window, mode)
    _, want = _match("reference", a.abs(), b, window, mode)
    assert torch.equal(indices, want)


def test_tile_argmax_forms_agree(device):
    """The compiled form of the lean row (max, argmax) and the interpreter's give the same answers:
    NaN rows (max NaN, no index), rows of only -inf (max -inf, the lowest index), ties (the lowest
    index), whatever form the scans call here."""
    R, K = 16, 32
    s = torch.randint(-3, 4, (R, K), generator=torch.Generator().manual_seed(3)).float()  # many ties
    s[1, 5] = s[2, 0] = s[2, 31] = s[3, 7] = float("nan")
    s[4] = s[5, :30] = float("-inf")
    s[6, 9] = float("inf")
    s = s.to(device)
    answers = []
    for compiled in (True, False):
        top, arg = torch.empty(R, device=device), torch.empty(R, dtype=torch.int32, device=device)
        _tile_argmax_probe[(1,)](s, top, arg, COMPILED=compiled, R=R, K=K)
        answers.append((top.cpu(), arg.cpu()))
    (top, arg), (top_i, arg_i) = answers
    want = s.cpu().max(1)
    nan_rows = torch.isnan(want.values)
    assert nan_rows.tolist()[:4] == [False, True, True, True]
    assert torch.equal(torch.isnan(top), nan_rows) and torch.equal(torch.isnan(top_i), nan_rows)
    assert torch.equal(top[~nan_rows], want.values[~nan_rows]) and torch.equal(top_i[~nan_rows], top[~nan_rows])
    assert torch.equal(arg, arg_i)
    assert (arg[nan_rows] == NO_HIT.value).all()  # the settle pass answers NaN rows
    first_at_max = (s.cpu() == want.values[:, None]).int().argmax(1)  # the lowest index at the max
    assert torch.equal(arg[~nan_rows].long(), first_at_max[~nan_rows])
    assert arg[4] == 0 and arg[5] >= 30 and arg[6] == 9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("normalize", [True, False])
def test_prepare_features(device, dtype, layout, normalize):
    # One pass per map. Forward: contiguous rows whose product with the scale is x_hat (the map
    # itself, unscaled, for ordinary features); backward: r = 1 / max(||x||, eps), proj = 1 where
    # the norm is not clamped (a zero voxel: r = 1e12, proj = 0), NaN for a NaN or Inf voxel when
    # normalising; rows are the map itself when its channels are innermost.
    from salign_kernels.ops.triton._runtime import voxel_major
    from salign_kernels.ops.triton.prepare import backward_factors, forward_rows

    feat = make_features((2, 70, 5, 7), dtype, seed=13, device=device)[0]
    feat[0, :, 1, 1] = 0.0
    feat[1, 3, 2, 2] = float("nan")
    feat[1, 5, 4, 6] = float("inf")
    x = voxel_major(as_layout(feat, layout))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    norms = torch.linalg.vector_norm(x.to(acc), dim=-1)
    want_r = norms.clamp_min(1e-12).reciprocal() if normalize else torch.ones_like(norms)
    if normalize:
        want_r[1, 2 * 7 + 2] = want_r[1, 4 * 7 + 6] = float("nan")
    rows, scale = forward_rows(x, normalize)
    torch.testing.assert_close(rows, x, atol=0, rtol=0, equal_nan=True)
    assert rows.stride(2) == 1 and rows.is_contiguous()
    assert (rows.data_ptr() == x.data_ptr()) == (layout == "channels_last" and not normalize)
    torch.testing.assert_close(scale, want_r, atol=0, rtol=1e-6, equal_nan=True)
    rows, r, proj = backward_factors(x, normalize, rows=True)
    assert (rows.data_ptr() == x.data_ptr()) == (layout == "channels_last")
    torch.testing.assert_close(r, want_r, atol=0, rtol=1e-6, equal_nan=True)
    if normalize:
        assert r[0, 1 * 7 + 1] == 1e12 and proj[0, 1 * 7 + 1] == 0
        keep = torch.isfinite(want_r) & (want_r < 1e12)
        assert (proj[keep] == 1).all()
    else:
        assert (proj == 0).all()
    assert scale.dtype == r.dtype == proj.dtype == acc


@pytest.mark.parametrize("exponent", [60, -60, 120, -126, -140])
def test_prepare_scales_extreme_voxels_by_a_power_of_two(device, exponent):
    # A voxel far from 1 is scaled by the power of two that brings it near 1 (exactly), and its
    # scale makes up for it: scale * rows is still x_hat, without any overflow or underflow.
    from salign_kernels.ops.triton.prepare import backward_factors, forward_rows

    plain = make_features((1, 3, 8), seed=14, device=device)[0].permute(0, 2, 1).contiguous()  # (B, N, C)
    x = torch.ldexp(plain, torch.tensor(exponent))
    rows, scale = forward_rows(x, True)
    largest = rows.abs().amax(-1)
    # Near 1; a denormal voxel only as far up as 2^127 takes it (still far from underflowing).
    assert torch.isfinite(rows).all() and largest.max() <= 4 and largest.min() >= (0.5 if exponent > -126 else 2**-24)
    x_hat = plain / torch.linalg.vector_norm(plain, dim=-1, keepdim=True)
    if 2.0**exponent * torch.linalg.vector_norm(plain.double(), dim=-1).max() >= 1e-12:
        torch.testing.assert_close(rows * scale[..., None], x_hat, atol=1e-6, rtol=1e-6)
    _, r, _ = backward_factors(x, True, rows=False)
    want = torch.linalg.vector_norm(x.double(), dim=-1).clamp_min(1e-12).reciprocal()
    torch.testing.assert_close(r.double(), want, atol=0, rtol=1e-6)


def _one_target_case(device, dtype=torch.float32):
    """Every query's best match in b is pixel 5, so its gradient sums every query's contribution."""
    shape = (2, 6, 7, 8)
    a, b = make_features(shape, dtype, seed=21, device=device)
    u = torch.linspace(1, 2, shape[1], device=device, dtype=dtype)
    a = u[None, :, None, None] + 0.05 * a
    b = b.clone()
    b[:, :, 0, 5] = u
    return a, b


def _grads(a, b, window=None, mode="sliding"):
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    values, indices = _match("triton", a, b, window, mode)
    upstream = torch.linspace(-1, 1, values.numel(), device=values.device).view_as(values)
    return indices, torch.autograd.grad((values * upstream).sum(), (a, b))


@pytest.mark.parametrize("window,mode", [(None, "sliding"), (7, "partition")])
def test_deterministic_backward(device, deterministic, window, mode):
    a, b = _one_target_case(device)
    indices, first = _grads(a, b, window, mode)
    if window is None:
        assert (indices == 5).all()
    _, second = _grads(a, b, window, mode)
    for x, y in zip(first, second):
        assert torch.equal(x, y)  # bit for bit
    torch.use_deterministic_algorithms(False)
    _, atomic = _grads(a, b, window, mode)
    for x, y in zip(first, atomic):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_op_paths_agree(device, dtype, normalize, layout):
    # The backward op straight from random indices (with invalid and out-of-range ones): the
    # deterministic (sorted segments) and atomic paths, against autograd through PyTorch's own
    # normalisation and gather in float64. One pixel's features are zero: its norm is clamped, so
    # its scale is a constant (no normalisation term). Gradients keep the features' strides.
    B, C, H, W = 2, 7, 5, 6
    N = H * W
    generator = torch.Generator().manual_seed(4)
    fa = as_layout(torch.randn(B, C, H, W, generator=generator).to(device, dtype), layout)
    fb = as_layout(torch.randn(B, C, H, W, generator=generator).to(device, dtype), layout)
    with torch.no_grad():
        fb[1, :, 0, 2] = 0.0
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.randn(B, H, W, generator=generator).to(device, acc)
    indices = torch.randint(0, 4, (B, H, W), generator=generator).to(device)  # many repeats
    indices[0, 0, :3] = -1
    indices[1, 2, 2] = N + 3  # out of range: treated as no match, never read
    indices[1, 0, 0] = 2  # the zero pixel
    op = _family(device).match_backward
    atomic = op(g, fa, fb, indices, normalize)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        sorted_path = op(g, fa, fb, indices, normalize)
    finally:
        torch.use_deterministic_algorithms(previous)

    x, y = fa.double().cpu().requires_grad_(), fb.double().cpu().requires_grad_()
    in_range = torch.where(indices.cpu() < N, indices.cpu(), -1)
    values = values_at(x, y, in_range, normalize)
    want = torch.autograd.grad((values * g.double().cpu()).sum(), (x, y))
    atol, rtol = GRAD_TOLERANCE[dtype]
    for got in (atomic, sorted_path):
        for grad, feature, w in zip(got, (fa, fb), want):
            assert grad.dtype == dtype and grad.stride() == feature.stride()
            torch.testing.assert_close(grad.double().cpu(), w, atol=atol * 4, rtol=rtol)


@pytest.mark.parametrize("window,mode", [(None, "sliding"), (3, "sliding"), (2, "partition")])
def test_torch_compile_has_no_graph_break(device, window, mode):
    # A training step's forward (loss of both directions, with masks); backward runs through the
    # compiled graph. fullgraph=True raises at the first graph break. The graph goes to aot_eager
    # (Dynamo + AOTAutograd + the fake implementations, without compiling C++ under the
    # interpreter), and the dense case on a GPU to inductor.
    shape = (2, 4, 6, 5)
    a, b = make_features(shape, seed=31, device=device)
    mask_b = make_mask(shape, 0.8, 5, device)

    def step(x, y):
        return sk.local_alignment_loss(
            x, y, window=window, window_mode=mode, symmetric=True, mask_b=mask_b, backend="triton"
        )

    torch._dynamo.reset()
    inductor = device == "cuda" and window is None  # one inductor compile is enough on a GPU
    compiled = torch.compile(step, fullgraph=True, backend="inductor" if inductor else "aot_eager")
    results = []
    for fn in (compiled, step):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        loss = fn(x, y)
        loss.backward()
        results.append((loss.detach(), x.grad, y.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def _family(device):
    """The op family the Triton kernels implement for tensors of ``device``."""
    from salign_kernels.ops.triton import library

    return library.family_for(torch.device(device))


def _op_args(device="cpu", **changes):
    a, b = make_features((1, 3, 4, 5), device=device)
    args = dict(feat_a=a, feat_b=b, mask_a=None, mask_b=None, window=[], mode=0, normalize=True)
    args.update(changes)
    return args


def _bad_forward_cases(device):
    x = _op_args(device)["feat_a"]
    mask = torch.ones(1, 4, 5, dtype=torch.bool, device=device)
    return [
        (dict(feat_a=x[0]), ValueError, r"feat_a must be \(B, C, H, W\) or \(B, C, D, H, W\)"),
        (dict(feat_b=x[:, :, :3].contiguous()), ValueError, "feat_b must have shape"),
        (dict(feat_a=x.int(), feat_b=x.int()), TypeError, "feat_a must be one of"),
        (dict(feat_b=x.double()), TypeError, "feat_b must have dtype"),
        (dict(feat_a=x[:0], feat_b=x[:0]), ValueError, "must not be empty"),
        (dict(mask_a=mask.float()), TypeError, "mask_a must have dtype torch.bool"),
        (dict(mask_b=mask[:, :3]), ValueError, r"mask_b must have shape \(B, \*spatial\)"),
        (dict(window=[3]), ValueError, "window must be \\[\\] \\(dense\\) or one size per spatial axis"),
        (dict(window=[3, -1]), ValueError, "window sizes must be ints in"),
        (dict(window=[3, 6]), ValueError, r"window sizes must be ints in \[1, max\(spatial\) = 5\]"),
        (dict(window=[3, 2], mode=WINDOW_MODE_CODES["sliding"]), ValueError, "sliding window sizes must be odd"),
        (dict(window=[3, 3], mode=7), ValueError, "mode must be one of"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_forward_op_rejects_contract_violations(device, case):
    changes, error, pattern = _bad_forward_cases(device)[case]
    with pytest.raises(error, match=pattern):
        _family(device).match(**_op_args(device, **changes))


def test_ops_allocate_without_deterministic_fills_and_restore_the_setting(device, monkeypatch):
    """In deterministic mode the ops' tensors are not filled on allocation (their kernels write every
    element: on a GPU a fill is one more launch per tensor), and the setting is as before after an
    op, also after one that raised."""
    from salign_kernels.ops.triton import dense

    seen, launch = [], dense.dense_match_forward
    monkeypatch.setattr(dense, "dense_match_forward", lambda *args, **kwargs: (
        seen.append(torch.utils.deterministic.fill_uninitialized_memory), launch(*args, **kwargs))[1])
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.utils.deterministic.fill_uninitialized_memory
        values, _ = _family(device).match(**_op_args(device))
        assert seen == [False] and torch.utils.deterministic.fill_uninitialized_memory
        with pytest.raises(ValueError, match="sliding window sizes must be odd"):
            _family(device).match(**_op_args(device, window=[3, 2]))
        assert torch.utils.deterministic.fill_uninitialized_memory
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert torch.equal(values, _family(device).match(**_op_args(device))[0])  # the same bits, fills or not


def test_symmetric_op_is_dense_only(device):
    with pytest.raises(ValueError, match="match_symmetric fuses dense matching only"):
        _family(device).match_symmetric(**_op_args(device, window=[3, 3]))


@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (2, 6, 3, 4, 5)])
def test_ops_take_layouts_without_copies(device, shape):
    # Contiguous and channels-last maps (2D and 3D) are read as they are (same result); the
    # gradients keep each one's strides. A view whose spatial axes do not flatten gets the same
    # answer through a copy, and its gradient comes back in empty_like's strides.
    a, b = make_features(shape, seed=9, device=device)
    layouts = ["contiguous", "channels_last", "transposed"]
    results = []
    for layout in layouts:
        if layout == "transposed":  # spatial axes that do not flatten: (W, H) memory order
            x = a.transpose(-1, -2).contiguous().transpose(-1, -2).detach().requires_grad_()
            y = b.transpose(-1, -2).contiguous().transpose(-1, -2).detach().requires_grad_()
        else:
            x, y = as_layout(a, layout).detach().requires_grad_(), as_layout(b, layout).detach().requires_grad_()
        values, indices = _family(device).match(x, y, None, None, [], 0, True)
        values.sum().backward()
        assert x.grad.stride() == torch.empty_like(x).stride() and y.grad.stride() == torch.empty_like(y).stride()
        results.append((values.detach(), indices, x.grad, y.grad))
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_backward_op_rejects_contract_violations(device):
    args = _op_args(device)
    fa, fb = args["feat_a"], args["feat_b"]
    g = torch.ones(1, 4, 5, device=device)
    indices = torch.zeros(1, 4, 5, dtype=torch.int64, device=device)
    op = _family(device).match_backward
    with pytest.raises(TypeError, match="indices must have dtype torch.int64"):
        op(g, fa, fb, indices.int(), True)
    with pytest.raises(ValueError, match="grad_values must have shape"):
        op(g[:, :2], fa, fb, indices, True)
    with pytest.raises(TypeError, match="grad_values must have dtype"):
        op(g.double(), fa, fb, indices, True)
    with pytest.raises(ValueError, match="feat_b must have shape"):
        op(g, fa, fb.transpose(2, 3), indices, True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of CPU tensors without a GPU")
def test_cpu_tensors_need_the_interpreter():
    from salign_kernels.ops import triton as backend

    assert backend.supports("cpu") == backend.interpreted()
    assert not backend.supports("meta")


def _run_python(code, **env):
    environment = dict(os.environ, **env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=environment, capture_output=True, text=True,
        timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_unavailable_without_cuda_or_interpreter():
    result = _run_python(
        """
        import torch, salign_kernels as sk
        status = sk.backends()["triton"]
        assert not status and "no CUDA device" in status.reason, status
        assert sk.resolve_backend("auto", "cpu") in ("cpp", "reference")
        try:
            sk.dense_match(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3), backend="triton")
        except sk.BackendUnavailableError as exc:
            assert "no CUDA device" in str(exc)
        else:
            raise SystemExit("backend='triton' did not raise")
        """,
        TRITON_INTERPRET="0",
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_import_never_fails_without_triton():
    result = _run_python(
        """
        import sys
        sys.modules["triton"] = None  # import triton -> ImportError
        import salign_kernels as sk
        from salign_kernels.ops import triton as backend
        status = sk.backends()["triton"]
        assert not status and "triton is not importable" in status.reason, status
        assert not backend.supports("cpu") and not backend.supports("cuda")
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# GPU only: the compiled kernels on shapes the interpreter cannot afford.


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_cuda_dense_autotuned(dtype, masked):
    # N = 4096 >= AUTOTUNE_MIN_PIXELS: the autotuned kernel, tensor-core bf16/fp16 tl.dot.
    check_against_reference("cuda", (2, 64, 64, 64), None, dtype=dtype, masked=masked, seed=41)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_cuda_fused_symmetric_autotuned(dtype, masked):
    _check_symmetric("cuda", (2, 64, 64, 72), masked, seed=46, dtype=dtype)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,mode", [(7, "sliding"), (8, "partition"), (3, "sliding")])
def test_cuda_windows_large(dtype, window, mode):
    check_against_reference("cuda", (2, 128, 48, 56), window, mode, dtype=dtype, masked=True, seed=42)


@pytest.mark.gpu
@needs_cuda
def test_cuda_tf32_only_when_allowed():
    a, b = make_features((1, 256, 32, 32), seed=43, device="cuda")
    want = reference.dense_match(a.double(), b.double())[0].float()
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        fp32 = sk.dense_match(a, b, backend="triton")[0]
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = sk.dense_match(a, b, backend="triton")[0]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    torch.testing.assert_close(fp32, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tf32, want, atol=5e-3, rtol=5e-3)
    assert not torch.equal(fp32, tf32)  # TF32 really was used when allowed


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["tf32x3", "ieee"])
def test_cuda_fp32_precisions(monkeypatch, precision):
    # float32 without TF32: three TF32 products per tile (the default) or true float32 products
    # (opt-in): float32 accuracy either way, checked against a float64 reference with the
    # float32 tolerance of the conformance tests.
    from salign_kernels.ops.triton import _runtime

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    previous = sk.set_float32_precision(precision)
    try:
        assert _runtime.feature_flags(torch.float32, torch.device("cuda"), False)["PRECISION"] == precision
        check_against_reference("cuda", (2, 128, 64, 64), None, masked=True, seed=47)
        a, b = make_features((1, 256, 32, 32), seed=43, device="cuda")
        want = reference.dense_match(a.double(), b.double())[0].float()
        torch.testing.assert_close(sk.dense_match(a, b, backend="triton")[0], want, atol=2e-5, rtol=2e-5)
    finally:
        sk.set_float32_precision(previous)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_follow_the_tensors_device():
    # Tensors on cuda:1 while cuda:0 is current: every kernel must run on cuda:1 (a launch goes to
    # the current device unless the launcher makes the tensors' device current).
    a, b = make_features((2, 16, 9, 11), seed=48, device="cuda:1")
    a.requires_grad_()
    with torch.cuda.device(0):
        for window in (None, 3):
            loss = sk.local_alignment_loss(a, b, window=window, symmetric=True, backend="triton")
            (grad_a,) = torch.autograd.grad(loss, a)
            want = sk.local_alignment_loss(a.detach().cpu().requires_grad_(), b.cpu(), window=window,
                                           symmetric=True, backend="reference")
            torch.testing.assert_close(loss.cpu(), want, atol=2e-5, rtol=2e-5)
            assert grad_a.device == a.device and torch.cuda.current_device() == 0


@pytest.mark.gpu
@needs_cuda
def test_cuda_deterministic_large(deterministic):
    a, b = make_features((2, 64, 40, 40), seed=44, device="cuda")
    first = _grads(a, b, 7, "sliding")[1]
    second = _grads(a, b, 7, "sliding")[1]
    for x, y in zip(first, second):
        assert torch.equal(x, y)


@pytest.mark.gpu
@needs_cuda
def test_cuda_memory_of_the_largest_case():
    # (4, 128, 256, 256) bf16, dense, forward + backward: the reference would need ~69 GB for its
    # similarity matrix alone; the kernels need O(B N C).
    shape = (4, 128, 256, 256)
    torch.cuda.empty_cache()
    a, b = make_features(shape, torch.bfloat16, seed=45, device="cuda")
    a.requires_grad_()
    b.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = sk.local_alignment_loss(a, b, backend="triton")
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert torch.isfinite(loss) and a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    input_bytes = a.numel() * a.element_size()
    assert extra < 16 * input_bytes, f"peak {extra / 2**30:.2f} GiB over {input_bytes / 2**30:.2f} GiB of input"
    # Spot check: 64 queries against the reference's matching restricted to them.
    with torch.no_grad():
        values, indices = sk.dense_match(a, b, backend="triton")
        xa = reference.prepare_features(a[:1], True).flatten(2)[:, :, :64]  # (1, C, 64)
        xb = reference.prepare_features(b[:1], True).flatten(2)
        want_values, want_indices = torch.bmm(xa.transpose(1, 2), xb).max(-1)
    torch.testing.assert_close(values[0].flatten()[:64], want_values[0], atol=2e-5, rtol=2e-5)
    differ = indices[0].flatten()[:64] != want_indices[0]
    assert differ.float().mean() < 0.05  # near-ties only


@pytest.mark.parametrize("step", [(1, 4), (4, 16)])  # parts of a row per step; whole rows, as on a GPU
@pytest.mark.parametrize("spatial,window,mode", [((11, 13), 5, "sliding"), ((11, 13), 4, "partition"),
                                                  ((5, 6, 7), 3, "sliding"), ((5, 6, 7), (2, 3, 2), "partition")])
@pytest.mark.parametrize("masked,normalize", [(False, True), (True, False)])
def test_window_seams_exact(device, monkeypatch, step, spatial, window, mode, masked, normalize):
    # The window scan against the reference exactly, 2D and 3D: entries in {-1, 1} over 4 channels
    # (norm 2) make every product and every normalisation exact, so the many ties (within a step,
    # across steps, across depths) are exact and their lowest index is checked, not approximated;
    # NaN candidates (a NaN similarity wins at
    # its first index), non-finite queries (their first candidate), with normalize=False a query
    # whose every candidate is -inf, and with masks a sample without any candidate (-1).
    from salign_kernels.ops.triton import window as window_module

    rows, halo_w = step
    monkeypatch.setattr(window_module, "box_chunk", lambda box_h, box_w, *args, **kwargs: (
        (rows, halo_w) if rows == 1 or halo_w >= box_w else (1, halo_w)))
    gen = torch.Generator().manual_seed(len(spatial) + masked)
    a = torch.randint(0, 2, (3, 4, *spatial), generator=gen).float() * 2 - 1
    b = torch.randint(0, 2, (3, 4, *spatial), generator=gen).float() * 2 - 1
    last = tuple(n - 1 for n in spatial)
    b[(0, 1, *last)] = float("nan")  # a NaN candidate in the last step of the boxes around it
    b[(0, 2) + tuple(n // 2 for n in spatial)] = float("nan")
    a[(1, slice(None)) + tuple(n // 2 for n in spatial)] = float("inf")  # non-finite queries
    a[(2, 0) + (1,) * len(spatial)] = float("nan")
    if not normalize:
        a[(1, slice(None)) + (2,) * len(spatial)] = 1.0
        b[1, 0] = float("-inf")  # query (2, 2[, 2]) of sample 1 against every candidate: -inf
    mask_a = mask_b = None
    if masked:
        mask_a = torch.rand(3, *spatial, generator=gen) > 0.2
        mask_b = torch.rand(3, *spatial, generator=gen) > 0.3
        mask_b[2] = False  # no candidate at all: every query of sample 2 gets -1
        mask_b[(0, *last)] = True
    want = reference.window_match(a, b, window, mode, mask_a, mask_b, normalize)
    moved = {k: None if m is None else m.to(device) for k, m in (("mask_a", mask_a), ("mask_b", mask_b))}
    got = sk.window_match(a.to(device), b.to(device), window, mode=mode, normalize=normalize, backend="triton",
                          **moved)
    assert torch.equal(got[1].cpu(), want[1])
    torch.testing.assert_close(got[0].cpu(), want[0], equal_nan=True, atol=1e-6, rtol=1e-6)
    assert torch.isnan(want[0][0]).any()  # the NaN cases are exercised, not masked away


def test_window_scan_leaves_only_its_rare_queries_to_the_settle_pass(device, monkeypatch):
    """The window scan answers every query of finite maps itself: no tile goes to the settle pass,
    whose exact walk costs more than twice the scan's (a lean epilogue that deferred everything
    would be right, and slow). A NaN candidate sends exactly the queries whose windows see it."""
    from salign_kernels.ops.triton import window as window_module

    kernel, left = window_module._window_match_fwd_kernel, []

    class Spy:  # records each settle pass's count of queries per tile (its marks argument)
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if kwargs["EXACT"]:
                    left.append(args[8].cpu().clone())
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(window_module, "_window_match_fwd_kernel", Spy())
    shape, k = (2, 8, 20, 21), 5
    a, b = make_features(shape, seed=5, device=device)
    sk.window_match(a, b, k, backend="triton")
    assert left[-1].sum() == 0 and left[-1].numel() > 1
    b[1, :, 9, 10] = float("nan")
    got = sk.window_match(a, b, k, backend="triton")
    want = reference.window_match(a.cpu(), b.cpu(), k, "sliding", None, None)
    assert torch.equal(got[1].cpu(), want[1])
    torch.testing.assert_close(got[0].cpu(), want[0], equal_nan=True, atol=2e-5, rtol=2e-5)
    # The queries within k // 2 of the NaN candidate, counted in their tiles (batch 1).
    tile_h, tile_w = window_module.query_tile(20, 21, window_module.INTERPRETED)
    tiles_w = -(-21 // tile_w)
    expected = torch.zeros_like(left[-1])
    programs = expected.numel() // 2
    for h in range(9 - k // 2, 9 + k // 2 + 1):
        for w in range(10 - k // 2, 10 + k // 2 + 1):
            expected[programs + (h // tile_h) * tiles_w + w // tile_w] += 1
    assert torch.equal(left[-1], expected)


@pytest.mark.parametrize("step", [(1, 2), (1, 4), (2, 16), (4, 32)])
@pytest.mark.parametrize("window,mode", [(5, "sliding"), (7, "sliding"), (4, "partition")])
def test_window_boxes_in_several_steps(device, monkeypatch, step, window, mode):
    """On a GPU the window kernel walks its query tile's box 64 candidates at a time (the
    interpreter takes more): force small steps here (``(ROWS, HALO_W)``: parts of a row, whole rows,
    several rows), so the running best across steps is checked too."""
    from salign_kernels.ops.triton import window as window_module

    rows, halo_w = step
    monkeypatch.setattr(window_module, "box_chunk", lambda box_h, box_w, *args, **kwargs: (
        (rows, halo_w) if rows == 1 or halo_w >= box_w else (1, halo_w)))
    shape = (2, 6, 9, 11)
    a, b = (x.to(device) for x in make_features(shape, seed=21))
    mask_b = make_mask(shape, 0.7, 22).to(device)
    # Exact ties across chunks: the first candidate must win, as within one chunk.
    b[:, :, 4, 5] = b[:, :, 4, 7]
    got = sk.window_match(a, b, window, mode=mode, mask_b=mask_b, backend="triton")
    want = reference.window_match(a.cpu(), b.cpu(), window, mode, None, mask_b.cpu())
    assert_same_matches((got[0].cpu(), got[1].cpu()), want, a.cpu(), b.cpu())
