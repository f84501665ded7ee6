"""Every compiled backend that runs on CPU here against the reference, case by case of the specification.

Shapes are small so that the Triton kernels can run here too, through the interpreter.
"""

from __future__ import annotations

import pytest
import torch

import salign_kernels as sk
from salign_kernels import reference
from helpers import (
    GRAD_TOLERANCE,
    VALUE_TOLERANCE,
    as_layout,
    assert_same_matches,
    cpu_backends,
    make_features,
    make_mask,
)

BACKENDS = cpu_backends()
pytestmark = pytest.mark.skipif(not BACKENDS, reason="no compiled backend runs on CPU here")


@pytest.fixture(params=BACKENDS or ["none"])
def backend(request):
    return request.param


MATCH_CASES = [
    # (B, C, H, W), window, mode
    ((2, 5, 7, 9), None, "sliding"),
    ((1, 1, 1, 13), None, "sliding"),
    ((1, 3, 13, 1), None, "sliding"),
    ((2, 6, 7, 9), 3, "sliding"),
    ((2, 4, 5, 11), 5, "sliding"),
    ((1, 3, 1, 13), 3, "sliding"),
    ((2, 3, 9, 7), 9, "sliding"),
    ((2, 5, 7, 9), 3, "partition"),
    ((2, 5, 8, 6), 4, "partition"),
    ((1, 2, 13, 1), 5, "partition"),
]


def run_match(backend, a, b, window, mode, **kw):
    if window is None:
        return sk.dense_match(a, b, backend=backend, **kw)
    return sk.window_match(a, b, window, mode=mode, backend=backend, **kw)


def grads_of(backend, a, b, window, mode, upstream, **kw):
    """Values, indices and the gradients of ``sum(values * upstream)`` for both inputs."""
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    if backend == "reference":
        values, indices = reference.window_match(a, b, window, mode, kw.get("mask_a"), kw.get("mask_b"), kw.get("normalize", True))
    else:
        values, indices = run_match(backend, a, b, window, mode, **kw)
    grad_a, grad_b = torch.autograd.grad((values * upstream).sum(), (a, b))
    return (values.detach(), indices), (grad_a, grad_b)


@pytest.mark.parametrize("shape,window,mode", MATCH_CASES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_match_values_indices_and_gradients(backend, shape, window, mode, masked, normalize):
    a, b = make_features(shape, seed=sum(shape))
    masks = dict(mask_a=make_mask(shape, 0.8, 2), mask_b=make_mask(shape, 0.6, 3)) if masked else {}
    upstream = torch.randn(shape[0], shape[2], shape[3])
    got, got_grads = grads_of(backend, a, b, window, mode, upstream, normalize=normalize, **masks)
    want, want_grads = grads_of("reference", a, b, window, mode, upstream, normalize=normalize, **masks)
    assert got[0].dtype == torch.float32
    assert_same_matches(got, want, a, b, normalize)
    atol, rtol = GRAD_TOLERANCE[torch.float32]
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window,mode", [(None, "sliding"), (3, "sliding"), (3, "partition")])
def test_dtypes(backend, dtype, window, mode):
    shape = (2, 6, 5, 7)
    a, b = make_features(shape, dtype, seed=11)
    mask_b = make_mask(shape, 0.7, 4)
    upstream = torch.randn(shape[0], shape[2], shape[3], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    got, got_grads = grads_of(backend, a, b, window, mode, upstream, mask_b=mask_b)
    want, want_grads = grads_of("reference", a, b, window, mode, upstream, mask_b=mask_b)
    assert got[0].dtype == want[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_same_matches(got, want, a, b, atol=VALUE_TOLERANCE[dtype][0])
    atol, rtol = GRAD_TOLERANCE[dtype]
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)


@pytest.mark.parametrize("window,mode", [(None, "sliding"), (3, "sliding"), (2, "partition")])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_loss_and_its_gradients(backend, window, mode, reduction, symmetric):
    shape = (2, 4, 6, 5)
    a, b = make_features(shape, seed=5)
    mask_a, mask_b = make_mask(shape, 0.7, 6), make_mask(shape, 0.8, 7)
    results = []
    for name in ("reference", backend):
        xa, xb = a.clone().requires_grad_(), b.clone().requires_grad_()
        loss = sk.local_alignment_loss(
            xa, xb, window=window, window_mode=mode, symmetric=symmetric, mask_a=mask_a, mask_b=mask_b,
            reduction=reduction, backend=name,
        )
        upstream = torch.linspace(-1, 1, loss.numel()).view_as(loss)
        results.append((loss.detach(), *torch.autograd.grad((loss * upstream).sum(), (xa, xb))))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("window,mode", [(None, "sliding"), (3, "sliding"), (3, "partition")])
def test_gradcheck(backend, window, mode):
    a, b = make_features((1, 3, 4, 5), torch.float64, seed=9)
    a.requires_grad_()
    b.requires_grad_()
    mask_b = make_mask(a.shape, 0.8, 8)

    def values(x, y):
        return run_match(backend, x, y, window, mode, mask_b=mask_b)[0]

    assert torch.autograd.gradcheck(values, (a, b))
    assert torch.autograd.gradcheck(
        lambda x, y: sk.local_alignment_loss(x, y, window=window, window_mode=mode, symmetric=True, backend=backend),
        (a, b),
    )


def test_ties_pick_the_lowest_index(backend):
    # b repeats one vector at 3 places; every query's best match is that vector: take the first.
    a, b = make_features((2, 4, 5, 6), seed=3)
    b[:, :, 1, 2] = b[:, :, 3, 4] = b[:, :, 4, 5] = a[:, :, 0, 0] * 10
    a = a[:, :, :1, :1].expand_as(a).clone()  # every query equals a[..., 0, 0]
    for normalize in (True, False):
        _, indices = sk.dense_match(a, b, normalize=normalize, backend=backend)
        assert (indices == 1 * 6 + 2).all()
    _, indices = sk.window_match(a, b, 5, mode="partition", normalize=False, backend=backend)
    assert indices[0, 0, 0] == 8 and indices[0, 4, 5] == 29  # tiles hold (1, 2) and (4, 5)


@pytest.mark.parametrize("window,mode", [(None, "sliding"), (3, "sliding"), (2, "partition")])
def test_nothing_valid(backend, window, mode):
    a, b = make_features((2, 3, 5, 4), seed=1)
    a.requires_grad_()
    b.requires_grad_()
    empty = torch.zeros(2, 5, 4, dtype=torch.bool)
    for masks in (dict(mask_a=empty), dict(mask_b=empty)):
        values, indices = run_match(backend, a, b, window, mode, **masks)
        assert (indices == -1).all() and (values == 0).all()
        loss = sk.local_alignment_loss(a, b, window=window, window_mode=mode, symmetric=True, backend=backend, **masks)
        assert loss.item() == 0.0
        grad_a, grad_b = torch.autograd.grad(loss, (a, b))
        assert not grad_a.any() and not grad_b.any()


def test_sample_with_every_candidate_masked(backend):
    a, b = make_features((3, 4, 5, 5), seed=2)
    mask_b = torch.ones(3, 5, 5, dtype=torch.bool)
    mask_b[1] = False
    got = sk.dense_match(a, b, mask_b=mask_b, backend=backend)
    assert (got[1][1] == -1).all()
    assert_same_matches(got, reference.dense_match(a, b, mask_b=mask_b), a, b)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["a", "b"])
@pytest.mark.parametrize("window,mode", [(None, "sliding"), (3, "sliding"), (2, "partition")])
def test_non_finite_features_give_a_nan_loss(backend, bad, where, window, mode):
    a, b = make_features((1, 3, 4, 4), seed=4)
    (a if where == "a" else b)[0, 0, 1, 1] = bad
    loss = sk.local_alignment_loss(a, b, window=window, window_mode=mode, symmetric=True, backend=backend)
    assert torch.isnan(loss)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("window,mode", [(None, "sliding"), (3, "sliding"), (2, "partition")])
def test_memory_layouts(backend, layout, window, mode):
    a, b = make_features((2, 5, 4, 6), seed=6)
    upstream = torch.randn(2, 4, 6)
    want, want_grads = grads_of(backend, a, b, window, mode, upstream)
    got, got_grads = grads_of(backend, as_layout(a, layout), as_layout(b, layout), window, mode, upstream)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


def test_window_of_one_matches_the_same_pixel(backend):
    a, b = make_features((2, 4, 3, 5), seed=8)
    for mode in ("sliding", "partition"):
        _, indices = sk.window_match(a, b, 1, mode=mode, backend=backend)
        assert indices.flatten(1).tolist() == [list(range(15))] * 2


# --- volumes: every compiled backend on the 3D cases of the specification ------------------------

MATCH_CASES_3D = [
    # (B, C, D, H, W), window, mode
    ((2, 5, 3, 4, 5), None, "sliding"),
    ((1, 3, 1, 1, 13), None, "sliding"),
    ((1, 4, 5, 1, 1), None, "sliding"),
    ((2, 4, 3, 5, 6), 3, "sliding"),
    ((1, 3, 4, 3, 7), (1, 3, 5), "sliding"),
    ((2, 3, 5, 2, 3), (5, 1, 3), "sliding"),
    ((1, 2, 3, 3, 3), 3, "sliding"),  # the window covers the volume
    ((2, 4, 3, 5, 6), 2, "partition"),
    ((1, 3, 5, 4, 7), (2, 3, 4), "partition"),  # ragged far edges on every axis
    ((1, 2, 3, 3, 3), 3, "partition"),  # one tile: dense matching
]


@pytest.mark.parametrize("shape,window,mode", MATCH_CASES_3D)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_volume_values_indices_and_gradients(backend, shape, window, mode, masked, normalize):
    a, b = make_features(shape, seed=sum(shape))
    masks = dict(mask_a=make_mask(shape, 0.8, 2), mask_b=make_mask(shape, 0.6, 3)) if masked else {}
    upstream = torch.randn(shape[0], *shape[2:])
    got, got_grads = grads_of(backend, a, b, window, mode, upstream, normalize=normalize, **masks)
    want, want_grads = grads_of("reference", a, b, window, mode, upstream, normalize=normalize, **masks)
    assert got[0].shape == got[1].shape == (shape[0], *shape[2:])
    assert_same_matches(got, want, a, b, normalize)
    atol, rtol = GRAD_TOLERANCE[torch.float32]
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)


@pytest.mark.parametrize("k,mode", [(3, "sliding"), (5, "sliding"), (2, "partition"), (4, "partition")])
def test_in_plane_windows_are_exactly_the_per_slice_result(backend, k, mode):
    # window (1, k, k) on a volume is the backend's own 2D matching of every slice, exactly: the
    # same values bit for bit, the slice's indices offset by d * H * W.
    B, C, D, H, W = 2, 6, 3, 7, 9
    a, b = make_features((B, C, D, H, W), seed=k)
    mask_b = make_mask((B, C, D, H, W), 0.7, 4)
    values, indices = sk.window_match(a, b, (1, k, k), mode=mode, mask_b=mask_b, backend=backend)
    slices = lambda x: x.transpose(1, 2).reshape(B * D, C, H, W)  # noqa: E731
    want_values, want_indices = sk.window_match(slices(a), slices(b), k, mode=mode,
                                                mask_b=mask_b.reshape(B * D, H, W), backend=backend)
    want_indices = want_indices.view(B, D, H, W)
    offset = (torch.arange(D) * H * W).view(1, D, 1, 1)
    assert torch.equal(indices, torch.where(want_indices >= 0, want_indices + offset, -1))
    assert torch.equal(values, want_values.view(B, D, H, W))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("window,mode", [(None, "sliding"), (3, "sliding"), (2, "partition")])
def test_volume_dtypes(backend, dtype, window, mode):
    shape = (2, 6, 3, 4, 5)
    a, b = make_features(shape, dtype, seed=11)
    mask_b = make_mask(shape, 0.7, 4)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    upstream = torch.randn(shape[0], *shape[2:], dtype=acc)
    got, got_grads = grads_of(backend, a, b, window, mode, upstream, mask_b=mask_b)
    want, want_grads = grads_of("reference", a, b, window, mode, upstream, mask_b=mask_b)
    assert_same_matches(got, want, a, b, atol=VALUE_TOLERANCE[dtype][0])
    atol, rtol = GRAD_TOLERANCE[dtype]
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)


@pytest.mark.parametrize("window,mode", [(None, "sliding"), ((1, 3, 3), "sliding"), (3, "sliding"), (2, "partition")])
def test_volume_gradcheck(backend, window, mode):
    a, b = make_features((1, 3, 3, 3, 4), torch.float64, seed=9)
    a.requires_grad_()
    b.requires_grad_()
    mask_b = make_mask(a.shape, 0.8, 8)
    assert torch.autograd.gradcheck(
        lambda x, y: sk.local_alignment_loss(x, y, window=window, window_mode=mode, symmetric=True, mask_b=mask_b,
                                             reduction="none", backend=backend),
        (a, b),
    )


@pytest.mark.parametrize("window,mode", [(None, "sliding"), (3, "sliding"), (2, "partition")])
def test_volume_ties_pick_the_lowest_flat_index(backend, window, mode):
    # Every candidate of b is the same vector (exact ties in every window): the lowest flat index wins.
    a, b = make_features((2, 4, 3, 4, 5), seed=3)
    if backend == "triton" and window is None:
        # The interpreter's tl.dot is numpy's matmul, whose BLAS may round identical columns of a
        # tile differently (OpenBLAS on AMD); entries +-1 make every product exact, so what is
        # tested is the kernel's lowest-index rule (see test_edge_cases.py).
        a, b = a.sign(), b.sign()
    b = b[:, :, :1, :1, :1].expand_as(b).contiguous()
    _, indices = run_match(backend, a, b, window, mode, normalize=False)
    _, want = reference.window_match(a, b, window, mode, normalize=False)
    assert torch.equal(indices, want)
    if window is None:
        assert (indices == 0).all()


@pytest.mark.parametrize("window,mode", [(None, "sliding"), (3, "sliding"), (2, "partition")])
def test_volume_nothing_valid(backend, window, mode):
    a, b = make_features((2, 3, 2, 3, 4), seed=1)
    a.requires_grad_()
    b.requires_grad_()
    empty = torch.zeros(2, 2, 3, 4, dtype=torch.bool)
    for masks in (dict(mask_a=empty), dict(mask_b=empty)):
        values, indices = run_match(backend, a, b, window, mode, **masks)
        assert (indices == -1).all() and (values == 0).all()
        loss = sk.local_alignment_loss(a, b, window=window, window_mode=mode, symmetric=True, backend=backend, **masks)
        assert loss.item() == 0.0
        grad_a, grad_b = torch.autograd.grad(loss, (a, b))
        assert not grad_a.any() and not grad_b.any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("window,mode", [(None, "sliding"), (3, "sliding"), (2, "partition")])
def test_volume_non_finite_features_give_a_nan_loss(backend, bad, window, mode):
    a, b = make_features((1, 3, 3, 4, 4), seed=4)
    b[0, 0, 1, 1, 1] = bad
    loss = sk.local_alignment_loss(a, b, window=window, window_mode=mode, symmetric=True, backend=backend)
    assert torch.isnan(loss)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("window,mode", [(None, "sliding"), (3, "sliding"), (2, "partition")])
def test_volume_memory_layouts(backend, layout, window, mode):
    a, b = make_features((2, 5, 3, 4, 6), seed=6)
    upstream = torch.randn(2, 3, 4, 6)
    want, want_grads = grads_of(backend, a, b, window, mode, upstream)
    got, got_grads = grads_of(backend, as_layout(a, layout), as_layout(b, layout), window, mode, upstream)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
