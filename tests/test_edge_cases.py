"""Numerical edge cases, on every backend that runs here (the reference, cpp, Triton under the
interpreter): huge and tiny features, exact ties between identical candidates, non-finite values
at masked and unmasked voxels, overflowing raw products, double backward, dtypes of the modules,
tiles beyond the interpreter's limits, and the API's corners.

Where the specification fixes an answer (lowest index on ties, NaN out, masked voxels neither query
nor candidate) it is asserted exactly; where it is silent, the float64 result of its formulas
(``spec_oracle``) decides.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import salign_kernels as sk
from salign_kernels import _backend, reference
from salign_kernels._matching import matching_of
from helpers import assert_same_matches, cpu_backends, make_features, make_mask
from spec_oracle import spec_match

BACKENDS = ["reference"] + cpu_backends()
COMPILED = cpu_backends()
KINDS = [(None, "sliding"), (3, "sliding"), (2, "partition")]


def match(backend, a, b, window, mode, **kw):
    if window is None:
        return sk.dense_match(a, b, backend=backend, **kw)
    return sk.window_match(a, b, window, mode=mode, backend=backend, **kw)


def loss_and_grads(backend, a, b, window, mode, symmetric=True, **kw):
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss = sk.local_alignment_loss(x, y, window=window, window_mode=mode, symmetric=symmetric, backend=backend, **kw)
    return (loss.detach(), *torch.autograd.grad(loss, (x, y)))


# --- 1. and 4. huge and large features: the norm must not overflow, nor its derivative underflow --


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,mode", KINDS)
def test_huge_features_are_normalised_without_overflow(backend, dtype, window, mode):
    a = torch.ones(1, 4, 3, 3, dtype=dtype) * 1e20
    assert sk.local_alignment_loss(a, a.clone(), window=window, window_mode=mode, backend=backend).item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("exponent", [50, 70, 100])  # |x| ~ 1e15 (its norm's cube underflows), 1e21, 1e30
@pytest.mark.parametrize("window,mode", KINDS)
def test_cosines_do_not_depend_on_the_scale(backend, dtype, exponent, window, mode):
    # Features 2^k times larger (exactly, in any float format) have the same unit vectors: the same
    # matches, the same values, and gradients exactly 2^-k times the plain ones' (d(x/||x||)/dx
    # scales as 1/||x||).
    plain_a, plain_b = (x.to(dtype) for x in make_features((2, 6, 5, 4), seed=1))
    mask_b = make_mask(plain_a.shape, 0.8, 2)
    big_a, big_b = torch.ldexp(plain_a, torch.tensor(exponent)), torch.ldexp(plain_b, torch.tensor(exponent))
    assert torch.isfinite(big_a).all()
    got, want = match(backend, big_a, big_b, window, mode, mask_b=mask_b), match(backend, plain_a, plain_b, window, mode,
                                                                               mask_b=mask_b)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
    loss, grad_a, grad_b = loss_and_grads(backend, big_a, big_b, window, mode, mask_b=mask_b)
    want_loss, want_a, want_b = loss_and_grads(backend, plain_a, plain_b, window, mode, mask_b=mask_b)
    torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=1e-6)
    scale = 2.0**exponent
    tolerance = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(grad_a.double() * scale, want_a.double(), **tolerance)
    torch.testing.assert_close(grad_b.double() * scale, want_b.double(), **tolerance)


# --- 2. exact ties between identical candidates go to the lowest index ---------------------------


def _first_candidate(spatial, window, mode):
    """The lowest flat index of every query's candidate set: where exact ties must go."""
    import itertools

    from spec_oracle import candidate_set

    return torch.tensor([candidate_set(p, spatial, window, mode)[0]
                         for p in itertools.product(*map(range, spatial))]).view(1, *spatial)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("window,mode", KINDS + [(5, "sliding"), (4, "partition")])
@pytest.mark.parametrize("spatial", [(5, 7), (9, 13), (3, 4, 5)])
def test_identical_candidates_tie_to_the_lowest_index(backend, normalize, window, mode, spatial):
    generator = torch.Generator().manual_seed(7)
    a = torch.randn(1, 16, *spatial, generator=generator)
    b = torch.randn(1, 16, *(1,) * len(spatial), generator=generator)
    if backend == "triton" and window is None:
        # Under the interpreter tl.dot is numpy's matmul, whose BLAS may round identical columns
        # of one tile differently (seen with OpenBLAS on AMD: columns 16-31 of a 32-wide tile);
        # a GPU's MMA computes every column alike. Entries +-1 (norm 4, normalised +-1/4) make
        # every product exact in any order, so the kernel's tie rule is what is tested.
        a, b = a.sign(), b.sign()
    b = b.expand(1, 16, *spatial).contiguous()
    _, indices = match(backend, a, b, window, mode, normalize=normalize)
    assert torch.equal(indices, _first_candidate(spatial, window, mode))


# --- 3. double backward: a clear error, never a silent zero --------------------------------------


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("window,mode", KINDS)
def test_double_backward_raises(backend, window, mode):
    a, b = make_features((1, 3, 4, 5), seed=2)
    a.requires_grad_()
    loss = sk.local_alignment_loss(a, b, window=window, window_mode=mode, backend=backend)
    (grad,) = torch.autograd.grad(loss, a, create_graph=True)
    with pytest.raises(RuntimeError, match=r"match_backward has no derivative"):
        grad.sum().backward()


# --- 5. tiny features: products that would underflow ----------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exponent", [-70, -90])  # |x| ~ 1e-21, 1e-27: squares underflow in float32
@pytest.mark.parametrize("window,mode", KINDS)
def test_tiny_features(backend, exponent, window, mode):
    # ||x|| < eps: the specification's normalisation is x / eps (the clamp), so the similarities
    # rank as the raw products do; the float64 formulas decide.
    plain_a, plain_b = make_features((2, 5, 4, 5), seed=3)
    a, b = torch.ldexp(plain_a, torch.tensor(exponent)), torch.ldexp(plain_b, torch.tensor(exponent))
    got = match(backend, a, b, window, mode)
    want = spec_match(a.double(), b.double(), window, mode)
    scale = float(want[0].abs().max())  # the similarities are ~ plain ones * 2^(2k) / eps^2
    torch.testing.assert_close(got[0].double() / scale, want[0] / scale, atol=1e-5, rtol=1e-5)
    assert (got[1] != want[1]).float().mean() < 0.05  # near-ties only
    assert torch.equal(got[1] >= 0, want[1] >= 0)
    _, grad_a, grad_b = loss_and_grads(backend, a, b, window, mode, reduction="sum")
    _, want_a, want_b = loss_and_grads("reference", a.double(), b.double(), window, mode, reduction="sum")
    for got_grad, want_grad in ((grad_a, want_a), (grad_b, want_b)):
        unit = float(want_grad.abs().max())
        torch.testing.assert_close(got_grad.double() / unit, want_grad / unit, atol=1e-5, rtol=1e-4)


# --- 6. NaN or Inf at a masked-out voxel reaches no gradient -------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("window,mode", KINDS)
def test_non_finite_masked_voxels_reach_nothing(backend, bad, window, mode):
    shape = (2, 4, 5, 6)
    a, b = make_features(shape, seed=4)
    mask_a, mask_b = make_mask(shape, 0.8, 5), make_mask(shape, 0.8, 6)
    mask_a[0, 1, 2] = mask_b[0, 1, 2] = mask_a[1, 3, 4] = mask_b[1, 0, 0] = False
    dirty_a, dirty_b = a.clone(), b.clone()
    dirty_a[0, :, 1, 2] = bad
    dirty_b[0, 2, 1, 2] = bad
    dirty_a[1, 0, 3, 4] = bad
    dirty_b[1, :, 0, 0] = bad
    masks = dict(mask_a=mask_a, mask_b=mask_b)
    loss, grad_a, grad_b = loss_and_grads(backend, dirty_a, dirty_b, window, mode, **masks)
    clean_loss, clean_a, clean_b = loss_and_grads(backend, a, b, window, mode, **masks)
    assert torch.isfinite(grad_a).all() and torch.isfinite(grad_b).all()
    torch.testing.assert_close(loss, clean_loss, atol=0, rtol=0)
    torch.testing.assert_close(grad_a, clean_a, atol=0, rtol=0)
    torch.testing.assert_close(grad_b, clean_b, atol=0, rtol=0)
    assert grad_a[0, :, 1, 2].eq(0).all() and grad_b[1, :, 0, 0].eq(0).all()


# --- 7. masked candidates are never chosen, not even by a NaN query ------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_query_never_picks_a_masked_candidate(backend):
    shape = (1, 4, 5, 6)
    a, b = make_features(shape, seed=8)
    mask_a = torch.ones(1, 5, 6, dtype=torch.bool)
    mask_a[0, 0, :3] = False  # a's first candidates are masked out
    b[0, :, 2, 2] = float("nan")  # a NaN query of b (the b -> a direction)
    impl = _backend.select(backend, a, matching_of(a))
    matching = matching_of(a, None, "sliding", mask_a, None, True)
    (_, _), (values_ba, indices_ba) = _backend.match_directions(impl, a, b, matching, symmetric=True)
    assert torch.isnan(values_ba[0, 2, 2])
    assert indices_ba[0, 2, 2] == 3  # the first candidate of a that is not masked
    assert mask_a.flatten()[indices_ba[indices_ba >= 0]].all()


# --- 8. every candidate at -inf: a valid candidate, value -inf, loss inf -------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window,mode", KINDS)
def test_every_candidate_at_minus_infinity(backend, window, mode):
    a = torch.ones(1, 4, 3, 4) * 1e20
    b = -torch.ones(1, 4, 3, 4) * 1e20  # raw products -4e40: -inf in float32
    mask_b = torch.ones(1, 3, 4, dtype=torch.bool)
    mask_b[0, 0, 0] = False
    values, indices = match(backend, a, b, window, mode, normalize=False, mask_b=mask_b)
    _, want = spec_match(torch.ones(1, 4, 3, 4), -torch.ones(1, 4, 3, 4), window, mode, mask_b=mask_b, normalize=False)
    assert torch.equal(indices, want)  # the first unmasked candidate: all tie at -inf
    assert (values == float("-inf")).all()
    loss = sk.local_alignment_loss(a, b, window=window, window_mode=mode, normalize=False, mask_b=mask_b, backend=backend)
    assert loss.item() == float("inf")


# --- 9. the modules in every dtype ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_modules_take_every_dtype(dtype):
    criterion = sk.SALoss(4, window=3, hidden=8, backend="reference")
    a, b = make_features((2, 4, 5, 5), dtype)
    pos_a, pos_b = torch.tensor([0.0, 0.5]), torch.tensor([0.5, 0.25])
    out = criterion(a, b, pos_a, pos_b)  # float32 head, features of another dtype
    assert torch.isfinite(out.total)
    assert sk.GlobalPositionalHead(4, hidden=8)(a, b).shape == (2,)


def test_a_float64_criterion_is_float64_throughout():
    criterion = sk.SALoss(3, hidden=4, backend="reference").double()
    a, b = make_features((2, 3, 3, 4), torch.float64)
    a.requires_grad_()
    pos_a, pos_b = torch.tensor([0.1, 0.7], dtype=torch.float64), torch.tensor([0.3, 0.2], dtype=torch.float64)
    out = criterion(a, b, pos_a, pos_b)
    assert out.total.dtype == out.local.dtype == out.positional.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda x: criterion(x, b, pos_a, pos_b).total, (a,))


# --- 10. and 11. raw products that overflow, infinite features: IEEE, as the reference -----------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window,mode", KINDS)
def test_raw_products_that_overflow(backend, window, mode):
    # Finite features whose raw products overflow: +inf similarities are the maximum (the lowest such
    # candidate), nothing is skipped. (A sum of overflowing products of both signs is inf - inf in
    # pairwise order but +-inf in a chain of fused multiply-adds, which the compiled kernels use:
    # its answer depends on the order of accumulation, so it is not asserted here.)
    a = torch.full((1, 2, 3, 4), 1e20)
    b = torch.full((1, 2, 3, 4), 0.5)
    b[0, :, 1, 1] = 1e20
    b[0, :, 1, 2] = 1e20
    b[0, :, 2, 3] = 1e20
    values, indices = match(backend, a, b, window, mode, normalize=False)
    want_values, want_indices = reference.window_match(a, b, window, mode, normalize=False)
    assert torch.equal(indices, want_indices) and torch.equal(values, want_values)
    assert (values == float("inf")).any()


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("window,mode", KINDS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_infinite_features_without_normalisation_follow_ieee(backend, window, mode, sign):
    a, b = make_features((1, 3, 4, 5), seed=9)
    a = a.abs() + 0.1  # positive queries
    b[0, 0, 1, 2] = sign * float("inf")  # +inf: the max wherever seen; -inf: never the max
    a[0, 0, 3, 3] = float("inf")  # a query with +inf: +inf or -inf or NaN with each candidate
    got = match(backend, a, b, window, mode, normalize=False)
    want = reference.window_match(a, b, window, mode, normalize=False)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], equal_nan=True)


# --- 12. the interpreter's tile limit ------------------------------------------------------------


@pytest.mark.skipif("triton" not in COMPILED, reason="the Triton backend does not run on CPU here")
@pytest.mark.parametrize("shape,window,mode", [
    ((1, 64, 17, 17), 17, "sliding"),
    ((1, 128, 13, 13), 13, "sliding"),
    ((1, 128, 12, 12), 12, "partition"),
    ((1, 4, 1, 129), 129, "sliding"),
])
def test_large_windows_fit_the_interpreter(shape, window, mode):
    a, b = make_features(shape, seed=10)
    got = sk.window_match(a, b, window, mode=mode, backend="triton")
    assert_same_matches(got, reference.window_match(a, b, window, mode), a, b)


# --- 13. a query holding an Inf: the reference's index -------------------------------------------


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("window,mode", KINDS)
def test_a_query_holding_an_inf_picks_the_references_index(backend, window, mode):
    a, b = make_features((2, 4, 5, 6), seed=11)
    a[0, 1, 2, 3] = float("inf")
    a[1, 0, 0, 0] = float("-inf")
    mask_b = make_mask(a.shape, 0.7, 12)
    got = match(backend, a, b, window, mode, mask_b=mask_b)
    want = reference.window_match(a, b, window, mode, mask_b=mask_b)
    assert torch.equal(got[1], want[1])
    assert torch.isnan(got[0][0, 2, 3]) and torch.isnan(got[0][1, 0, 0])


# --- 14. the API's corners -----------------------------------------------------------------------


@pytest.mark.parametrize("gp_weight", [float("inf"), -float("inf")])
def test_gp_weight_must_be_finite(gp_weight):
    with pytest.raises(ValueError, match=r"gp_weight must be a finite number >= 0; got"):
        sk.SALoss(8, gp_weight=gp_weight)


@pytest.mark.parametrize("window,mode", KINDS)
def test_meta_features_trace_shapes_with_auto(window, mode):
    a = torch.empty(2, 4, 5, 6, device="meta")
    loss = sk.local_alignment_loss(a, a, window=window, window_mode=mode, symmetric=True, reduction="none")
    assert loss.device.type == "meta" and loss.shape == (2, 2, 5, 6)
    values, indices = match("auto", a, a, window, mode)
    assert values.shape == indices.shape == (2, 5, 6) and indices.dtype == torch.int64


@pytest.mark.skipif("triton" not in COMPILED, reason="the Triton backend does not run on CPU here")
def test_a_batch_beyond_the_grid_limit_raises():
    a = torch.randn(65536, 1, 1, 2)
    with pytest.raises(ValueError, match=r"batch of 65536 maps; at most 65535 per call"):
        sk.dense_match(a, a, backend="triton")
