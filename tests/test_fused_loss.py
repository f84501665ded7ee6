"""The Triton backend's fused loss op (``alignment_loss``): the same loss and gradients as the
matches reduced in PyTorch (:mod:`salign_kernels._reduction`), on every case the op takes.

The gradient of the fused op is computed in the kernels from the saved values, in the order of
operations of PyTorch's autograd of the composed reduction, and through the rows and factors the
forward prepared: under the interpreter (sequential atomics) it is bit for bit that of the composed
path in float32 and float64. The loss itself sums in another order (per program, then the
programs): equal to rounding.
"""

from __future__ import annotations

import pytest
import torch

import salign_kernels as sk
from salign_kernels import _backend
from salign_kernels._validation import check_match_inputs
from helpers import as_layout, make_features, make_mask

pytest.importorskip("triton")
if not sk.backends()["triton"]:
    pytest.skip(f"triton unavailable: {sk.backends()['triton'].reason}", allow_module_level=True)

from salign_kernels.ops import triton as triton_backend  # noqa: E402
from salign_kernels.ops.triton import library  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _losses_and_grads(a, b, *, window=None, window_mode="sliding", symmetric=False, reduction="mean",
                      mask_a=None, mask_b=None, normalize=True):
    """``(fused, composed)``: each ``(loss, grad_a, grad_b)``, the fused op and the Triton matches
    reduced in PyTorch, on the same tensors."""
    matching = check_match_inputs(a, b, mask_a, mask_b, normalize, window, window_mode)
    out = []
    for fused in (True, False):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        if fused:
            loss = triton_backend.fused_alignment_loss(x, y, matching, symmetric, reduction)
        else:
            loss = _backend.composed_alignment_loss(triton_backend, x, y, matching, symmetric, reduction)
        grads = torch.autograd.grad(loss, (x, y))
        out.append((loss.detach(), *grads))
    return out


def _assert_same(fused, composed, exact_grads=True, grad_tolerance=(1e-5, 1e-6)):
    loss, ga, gb = fused
    want, wa, wb = composed
    assert loss.shape == () and loss.dtype == want.dtype
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-7, equal_nan=True)
    for got, expected in ((ga, wa), (gb, wb)):
        assert got.dtype == expected.dtype and got.stride() == expected.stride()
        if exact_grads and DEVICE == "cpu":
            assert torch.equal(got, expected) or torch.equal(got.isnan(), expected.isnan()) and torch.equal(
                got.nan_to_num(), expected.nan_to_num()), (got - expected).abs().max()
        else:
            rtol, atol = grad_tolerance
            torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, equal_nan=True)


CASES = [
    # shape, window, mode
    ((2, 8, 7, 9), None, "sliding"),
    ((1, 5, 1, 37), None, "sliding"),  # 1 x N, prime
    ((2, 8, 7, 9), 3, "sliding"),
    ((2, 8, 7, 9), 4, "partition"),
    ((1, 6, 3, 5, 7), None, "sliding"),  # volumes
    ((1, 6, 3, 5, 7), (3, 3, 5), "sliding"),
    ((1, 6, 3, 5, 7), 2, "partition"),
]


@pytest.mark.parametrize("shape,window,mode", CASES)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_loss_is_the_reduced_matches(shape, window, mode, symmetric, reduction):
    a, b = make_features(shape, device=DEVICE)
    fused, composed = _losses_and_grads(a, b, window=window, window_mode=mode, symmetric=symmetric,
                                        reduction=reduction)
    _assert_same(fused, composed)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 3])
def test_fused_loss_dtypes(dtype, window):
    a, b = make_features((2, 12, 6, 7), dtype, device=DEVICE)
    fused, composed = _losses_and_grads(a, b, window=window, symmetric=True)
    # Half gradients: the composed path rounds each direction's share to the dtype before adding
    # them, the fused one adds in float32 and rounds once.
    half = dtype in (torch.float16, torch.bfloat16)
    _assert_same(fused, composed, exact_grads=not half, grad_tolerance=(1e-2, 1e-3) if half else (1e-5, 1e-6))


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_fused_loss_masks_layouts_normalisation(window, normalize, layout):
    shape = (2, 6, 7, 5)
    a, b = (as_layout(x, layout) for x in make_features(shape, device=DEVICE))
    masks = dict(mask_a=make_mask(shape, 0.7, 1, DEVICE), mask_b=make_mask(shape, 0.6, 2, DEVICE))
    fused, composed = _losses_and_grads(a, b, window=window, symmetric=True, normalize=normalize, **masks)
    _assert_same(fused, composed)


@pytest.mark.parametrize("window", [None, 3])
def test_fused_loss_with_nothing_valid_is_zero_with_zero_gradients(window):
    shape = (2, 4, 5, 6)
    a, b = make_features(shape, device=DEVICE)
    none = torch.zeros(shape[0], *shape[2:], dtype=torch.bool, device=DEVICE)
    for masks in (dict(mask_a=none), dict(mask_b=none), dict(mask_a=none, mask_b=none)):
        fused, composed = _losses_and_grads(a, b, window=window, symmetric=True, **masks)
        _assert_same(fused, composed)
        assert fused[0].item() == 0 and not fused[1].any() and not fused[2].any()


@pytest.mark.parametrize("window", [None, 3])
def test_fused_loss_nan_in_nan_out_and_the_gradient_of_the_rest(window):
    """A NaN feature makes the loss NaN; its gradient is the composed path's (PyTorch's sgn(NaN) = 0
    at the NaN values, the other queries' gradients as usual)."""
    a, b = make_features((1, 4, 6, 6), device=DEVICE)
    a[0, :, 2, 3] = float("nan")
    fused, composed = _losses_and_grads(a, b, window=window, symmetric=True)
    assert fused[0].isnan()
    _assert_same(fused, composed)


def test_fused_loss_outputs_are_the_matches():
    """The op's saved values and indices are those of the match op, direction by direction, and its
    counts the valid queries."""
    shape = (2, 6, 7, 5)
    a, b = make_features(shape, device=DEVICE)
    mask_a = make_mask(shape, 0.7, 1, DEVICE)
    matching = check_match_inputs(a, b, mask_a, None, True, None, "sliding")
    family = library.family_for(a.device)
    out = family.alignment_loss(a, b, mask_a, None, [], 0, True, True, True)
    loss, values, indices, counts = out[:4]
    for d, (v, i) in enumerate(_backend.match_directions(triton_backend, a, b, matching, True)):
        assert torch.equal(values[d].view_as(v), v) and torch.equal(indices[d].view_as(i), i)
        assert counts[d].item() == int((i >= 0).sum())


def test_fused_loss_deterministic_backward_is_the_same_bits():
    a, b = make_features((2, 8, 6, 7), device=DEVICE)
    previous = torch.are_deterministic_algorithms_enabled()
    results = []
    try:
        for deterministic in (False, True, True):
            torch.use_deterministic_algorithms(deterministic)
            results.append(_losses_and_grads(a, b, symmetric=True)[0])
    finally:
        torch.use_deterministic_algorithms(previous)
    for got in results[1:]:
        assert torch.equal(got[0], results[0][0])
        torch.testing.assert_close(got[1:], results[0][1:], rtol=1e-6, atol=1e-7)
    assert all(torch.equal(x, y) for x, y in zip(results[1], results[2]))


def test_functional_loss_takes_the_fused_op_except_for_none(monkeypatch):
    calls = []
    fused = triton_backend.fused_alignment_loss
    monkeypatch.setattr(triton_backend, "fused_alignment_loss", lambda *args: calls.append(args[-1]) or fused(*args))
    a, b = make_features((1, 4, 5, 6), device=DEVICE)
    for reduction in ("mean", "sum", "none"):
        sk.local_alignment_loss(a, b, reduction=reduction, backend="triton")
    assert calls == ["mean", "sum"]


def test_fused_loss_has_no_double_backward():
    a, b = (x.requires_grad_() for x in make_features((1, 4, 5, 6), device=DEVICE))
    loss = sk.local_alignment_loss(a, b, backend="triton")
    (grad_a,) = torch.autograd.grad(loss, a, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        grad_a.sum().backward()


def _saved(shape=(2, 4, 5, 6), symmetric=True):
    a, b = make_features(shape, device=DEVICE)
    family = library.family_for(a.device)
    out = family.alignment_loss(a, b, None, None, [], 0, True, symmetric, True)
    return family, a, b, list(out)


BAD_SAVED = {
    # output index -> (replacement from the good one, message)
    "grad_loss": (lambda g: g.double(), "grad_loss must be a one-element"),
    "values_rank": (lambda v: v[0], "values must be \\(directions, B, N\\)"),
    "values_directions": (lambda v: torch.cat([v, v, v]), "values must be \\(directions, B, N\\)"),
    "values_dtype": (lambda v: v.double(), "values must be a torch.float32"),
    "indices_shape": (lambda i: i[:, :, :-1], "indices must be a torch.int64"),
    "counts_dtype": (lambda c: c.int(), "counts must be a torch.int64"),
    "factors_a_shape": (lambda f: f[:2], "factors_a must be"),
    "factors_b_device_or_dtype": (lambda f: f.double(), "factors_b must be"),
    "values_contiguous": (lambda v: v.transpose(1, 2).contiguous().transpose(1, 2), "values must be contiguous"),
    "rows_a_shape": (lambda r: r[:, :-1], "rows_a must be empty or contiguous"),
    "rows_b_dtype": (lambda r: r.double(), "rows_b must be empty or contiguous"),
}
POSITION = {"grad_loss": None, "values": 1, "indices": 2, "counts": 3, "rows_a": 4, "factors_a": 5, "rows_b": 6,
            "factors_b": 7}


@pytest.mark.parametrize("case", list(BAD_SAVED))
def test_fused_backward_op_rejects_contract_violations(case):
    family, a, b, out = _saved((2, 4, 6, 6))
    name = next(n for n in POSITION if case.startswith(n))
    change, message = BAD_SAVED[case]
    grad_loss = torch.ones((), dtype=out[0].dtype, device=DEVICE)
    if name == "grad_loss":
        grad_loss = change(grad_loss)
    else:
        out[POSITION[name]] = change(out[POSITION[name]])
    with pytest.raises(ValueError, match=message):
        family.alignment_loss_backward(grad_loss, a, b, *out[1:], True)


def test_fused_backward_op_takes_an_empty_rows_for_the_map_itself():
    """Without normalisation and with the channels innermost the forward writes no rows (``(0,)``):
    the backward then reads the map, and gives the composed gradient."""
    a, b = (x.contiguous(memory_format=torch.channels_last) for x in make_features((2, 4, 5, 6), device=DEVICE))
    family = library.family_for(a.device)
    out = family.alignment_loss(a, b, None, None, [], 0, False, False, True)
    assert out[4].shape == (0,) and out[6].shape == (0,)
    fused, composed = _losses_and_grads(a, b, normalize=False)
    _assert_same(fused, composed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_prepare_pair_is_both_preparations_in_one_launch(dtype, normalize, layout):
    """Rows and factors of the one launch for both maps are, bit for bit, the forward's rows and
    scales and the backward's ``r`` and ``proj`` of the single-map preparation, extreme voxels
    (rescaled by a power of two) and NaN included."""
    from salign_kernels.ops.triton._runtime import voxel_major
    from salign_kernels.ops.triton.prepare import backward_factors, forward_rows, prepare_pair, writes_rows

    a, b = (as_layout(x, layout) for x in make_features((2, 5, 4, 6), dtype, device=DEVICE))
    a[0, :, 1, 2] *= 2.0**60 if dtype != torch.float64 else 2.0**600
    b[1, :, 0, 0] = float("nan")
    va, vb = voxel_major(a), voxel_major(b)
    write_a, write_b = writes_rows(va, normalize), writes_rows(vb, normalize)
    rows_a, factors_a, rows_b, factors_b = prepare_pair(va, vb, normalize, write_a, write_b)
    for x, rows, factors in ((va, rows_a, factors_a), (vb, rows_b, factors_b)):
        want_rows, want_scale = forward_rows(x, normalize)
        _, want_r, want_proj = backward_factors(x, normalize, rows=False)
        assert torch.equal(rows.nan_to_num(), want_rows.nan_to_num())
        for got, want in zip(factors, (want_scale, want_r, want_proj)):
            assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("window,symmetric", [([], True), ([3, 3], False)])
def test_fused_op_passes_opcheck(window, symmetric):
    """Schema, fake implementation (what torch.compile traces), autograd registration and the
    AOT-dispatched backward agree with the real op."""
    a, b = (x.requires_grad_() for x in make_features((1, 4, 5, 6), device=DEVICE))
    family = library.family_for(a.device)
    torch.library.opcheck(family.alignment_loss, (a, b, None, None, window, 0, True, symmetric, True))
