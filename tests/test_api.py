"""The public API: functions, modules, backend reporting and the self-check."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import salign_kernels as sk
from salign_kernels import reference
from helpers import make_features, make_mask


def test_public_names():
    for name in [
        "dense_match", "window_match", "local_alignment_loss", "global_positional_loss",
        "LocalAlignmentLoss", "GlobalPositionalHead", "SALoss", "backends",
        "SALossOutput", "feature_mask", "SALModel", "SALPrepareBatch", "sal_total",
    ]:
        assert hasattr(sk, name), name


def test_backends_report():
    report = sk.backends()
    assert list(report) == ["reference", "cpp", "triton"]
    assert report["reference"] == True  # noqa: E712 - the documented way to read it
    for name, status in report.items():
        assert isinstance(status, sk.BackendStatus)
        assert bool(status) == status.available
        if not status:
            assert status.reason, f"{name} is unavailable without a reason"
            assert status.reason in repr(status)


def test_auto_resolves_to_an_available_backend():
    name = sk.resolve_backend("auto", "cpu")
    assert sk.backends()[name]
    assert sk.resolve_backend("reference", "cpu") == "reference"


@pytest.mark.parametrize("window,mode", [(None, "sliding"), (3, "sliding"), (4, "partition")])
def test_functional_api_matches_the_reference(window, mode):
    shape = (2, 6, 7, 9)
    a, b = make_features(shape)
    mask_a, mask_b = make_mask(shape, 0.8, 1), make_mask(shape, 0.7, 2)
    if window is None:
        got = sk.dense_match(a, b, mask_a=mask_a, mask_b=mask_b, backend="reference")
    else:
        got = sk.window_match(a, b, window, mode=mode, mask_a=mask_a, mask_b=mask_b, backend="reference")
    want = reference.window_match(a, b, window, mode, mask_a, mask_b)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    loss = sk.local_alignment_loss(a, b, window=window, window_mode=mode, symmetric=True, mask_a=mask_a, backend="reference")
    torch.testing.assert_close(loss, reference.local_alignment_loss(a, b, window, mode, True, mask_a))


def test_local_alignment_loss_module_equals_the_function():
    a, b = make_features((2, 4, 5, 5))
    mask = make_mask(a.shape)
    module = sk.LocalAlignmentLoss(window=3, symmetric=True, reduction="sum")
    want = sk.local_alignment_loss(a, b, window=3, symmetric=True, mask_b=mask, reduction="sum")
    torch.testing.assert_close(module(a, b, mask_b=mask), want)
    assert "window=3" in repr(module)


def test_positional_head_shapes_and_gradients():
    head = sk.GlobalPositionalHead(6, hidden=16)
    a, b = make_features((4, 6, 5, 7))
    a.requires_grad_()
    pred = head(a, b)
    assert pred.shape == (4,)
    pred.sum().backward()
    assert a.grad.shape == a.shape and a.grad.abs().sum() > 0
    assert all(p.grad is not None for p in head.parameters())


def test_positional_head_is_order_sensitive():
    # Swapping the slices must be able to change the prediction: the offset is signed.
    torch.manual_seed(0)
    head = sk.GlobalPositionalHead(3, hidden=8)
    a, b = make_features((2, 3, 4, 4))
    assert not torch.allclose(head(a, b), head(b, a))


def test_positional_loss_values():
    pred = torch.tensor([0.5, -0.25])
    pos_a, pos_b = torch.tensor([0.0, 0.5]), torch.tensor([0.25, 0.25])  # offsets 0.25, -0.25
    assert sk.global_positional_loss(pred, pos_a, pos_b).item() == pytest.approx(0.125)
    assert sk.global_positional_loss(pred, pos_a, pos_b, reduction="sum").item() == pytest.approx(0.25)
    torch.testing.assert_close(sk.global_positional_loss(pred, pos_a, pos_b, reduction="none"), torch.tensor([0.25, 0.0]))


def test_sa_loss_total_is_local_plus_weighted_positional():
    torch.manual_seed(0)
    criterion = sk.SALoss(4, window=3, symmetric=True, gp_weight=0.5, hidden=8, backend="reference")
    a, b = make_features((3, 4, 6, 6))
    a.requires_grad_()
    pos_a, pos_b = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.2, 0.4, 0.9])
    mask = make_mask(a.shape)
    out = criterion(a, b, pos_a, pos_b, mask_a=mask)
    assert isinstance(out, sk.SALossOutput)
    torch.testing.assert_close(out.local, sk.local_alignment_loss(a, b, window=3, symmetric=True, mask_a=mask))
    pred = criterion.head(a, b)
    torch.testing.assert_close(out.positional, sk.global_positional_loss(pred, pos_a, pos_b))
    torch.testing.assert_close(out.total, out.local + 0.5 * out.positional)
    out.total.backward()
    assert a.grad is not None and all(p.grad is not None for p in criterion.parameters())


def test_sa_loss_with_half_features_returns_float32():
    criterion = sk.SALoss(4, hidden=8).to(torch.bfloat16)
    a, b = make_features((2, 4, 5, 5), torch.bfloat16)
    out = criterion(a, b, torch.tensor([0.0, 0.5]), torch.tensor([0.5, 0.25]))
    assert out.total.dtype == torch.float32 and out.local.dtype == torch.float32


def test_check_module_runs_and_passes():
    result = subprocess.run([sys.executable, "-m", "salign_kernels.check"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "backends:" in result.stdout and "torch" in result.stdout
    assert "reference" in result.stdout


def test_import_without_the_compiled_extension():
    """A missing extension makes the cpp backend unavailable, with the reason; nothing else breaks."""
    script = (
        "import sys; sys.modules['salign_kernels._C'] = None\n"  # makes `import salign_kernels._C` fail
        "import torch, salign_kernels as sk\n"
        "status = sk.backends()['cpp']\n"
        "assert not status and 'not built' in status.reason, status\n"
        "assert sk.resolve_backend('auto', 'cpu') == 'reference'\n"
        "try:\n"
        "    sk.dense_match(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3), backend='cpp')\n"
        "except sk.BackendUnavailableError as e:\n"
        "    print('raised:', e)\n"
        "for _ in range(3):\n"
        "    print(sk.local_alignment_loss(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)).item())\n"
    )
    # Without the switch the sources would compile at first use (tests/test_install.py does that).
    env = dict(os.environ, SALIGN_KERNELS_JIT="0")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "raised: backend='cpp' is not available: the C++ extension salign_kernels._C is not built" in result.stdout
    assert "compiling it at first use is switched off (SALIGN_KERNELS_JIT=0)" in result.stdout
    # auto falls back to the reference with a warning that says why, once.
    assert result.stderr.count("backend='auto' on cpu tensors cannot use 'cpp'") == 1, result.stderr
    assert "not built" in result.stderr


def test_backend_names_derive_from_the_table():
    from salign_kernels import _backend

    assert tuple(sk.backends()) == _backend.NAMES == tuple(entry.name for entry in _backend.BACKENDS)
    assert _backend.BACKEND_NAMES == ("auto",) + _backend.NAMES
    assert _backend._auto_order("cpu")[-1] == "reference" and "cpp" in _backend._auto_order("cpu")
    assert _backend._auto_order("cuda") == ("triton", "reference")
    assert _backend._auto_order("mps") == ("reference",)


def test_a_backend_that_cannot_run_a_problem(monkeypatch):
    """The capability check on the actual inputs: an explicit request raises with the reason, auto
    passes the backend over with a warning (once) and the next backend runs."""
    import types
    import warnings

    from salign_kernels import _backend

    reference_module = _backend._load("reference")[0]
    picky = types.SimpleNamespace(
        name="cpp", status=lambda: _backend.BackendStatus(True), supports=lambda device: True,
        unsupported=lambda feat, matching: "no 3D here" if matching.ndim == 3 else None,
        match=reference_module.match, fuses_symmetric=lambda feat, matching: False,
    )
    monkeypatch.setitem(_backend._LOADED, "cpp", (picky, _backend.BackendStatus(True)))
    monkeypatch.setattr(_backend, "_WARNED", set())
    volume_a, volume_b = make_features((1, 2, 3, 4, 5))
    with pytest.raises(sk.BackendUnavailableError, match=r"backend='cpp' cannot run this problem: no 3D here"):
        sk.dense_match(volume_a, volume_b, backend="cpp")
    with pytest.warns(RuntimeWarning, match=r"backend='auto' passes over 'cpp' for this problem: no 3D here"):
        got = sk.dense_match(volume_a, volume_b)
    assert torch.equal(got[1], reference.dense_match(volume_a, volume_b)[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sk.dense_match(volume_a, volume_b)  # said once
        sk.dense_match(*make_features((1, 2, 4, 5)))  # 2D: the backend runs it


def test_window_as_an_int_or_one_size_per_axis():
    a, b = make_features((2, 4, 3, 5, 6))
    for window, mode in [(3, "sliding"), (2, "partition")]:
        by_int = sk.window_match(a, b, window, mode=mode, backend="reference")
        by_tuple = sk.window_match(a, b, (window,) * 3, mode=mode, backend="reference")
        assert torch.equal(by_int[1], by_tuple[1]) and torch.equal(by_int[0], by_tuple[0])
    module = sk.LocalAlignmentLoss(window=[1, 3, 3])
    assert module.window == (1, 3, 3) and "window=(1, 3, 3)" in repr(module)
    torch.testing.assert_close(module(a, b), sk.local_alignment_loss(a, b, window=(1, 3, 3)))


def test_positional_head_on_volumes_with_several_coordinates():
    head = sk.GlobalPositionalHead(5, hidden=16, out_features=3)
    a, b = make_features((4, 5, 3, 4, 6))
    a.requires_grad_()
    pred = head(a, b)
    assert pred.shape == (4, 3)
    pooled = torch.cat([a.mean(dim=(2, 3, 4)), b.mean(dim=(2, 3, 4))], dim=1)
    torch.testing.assert_close(pred, head.mlp(pooled))
    pred.sum().backward()
    assert a.grad.shape == a.shape
    assert sk.GlobalPositionalHead(5, hidden=16)(a, b).shape == (4,)
    with pytest.raises(ValueError, match=r"out_features must be >= 1; got 0"):
        sk.GlobalPositionalHead(5, out_features=0)


def test_positional_loss_of_several_coordinates():
    pred = torch.tensor([[0.5, 0.0, 0.1], [-0.25, 0.2, 0.0]])
    pos_a = torch.tensor([[0.0, 0.5, 0.5], [0.5, 0.5, 0.5]])
    pos_b = torch.tensor([[0.25, 0.5, 0.5], [0.25, 0.5, 0.5]])
    # |errors|: [0.25, 0, 0.1], [0, 0.2, 0]: mean over batch and coordinates
    assert sk.global_positional_loss(pred, pos_a, pos_b).item() == pytest.approx(0.55 / 6)
    assert sk.global_positional_loss(pred, pos_a, pos_b, reduction="none").shape == (2, 3)


def test_sa_loss_on_sub_volumes():
    torch.manual_seed(0)
    criterion = sk.SALoss(4, window=(3, 3, 3), symmetric=True, hidden=8, pos_dims=3, backend="reference")
    a, b = make_features((2, 4, 3, 4, 5))
    a.requires_grad_()
    pos_a, pos_b = torch.rand(2, 3), torch.rand(2, 3)
    mask = make_mask(a.shape)
    out = criterion(a, b, pos_a, pos_b, mask_a=mask)
    torch.testing.assert_close(out.local, sk.local_alignment_loss(a, b, window=3, symmetric=True, mask_a=mask))
    torch.testing.assert_close(out.positional, sk.global_positional_loss(criterion.head(a, b), pos_a, pos_b))
    out.total.backward()
    assert a.grad is not None and all(p.grad is not None for p in criterion.parameters())
    with pytest.raises(ValueError, match=r"pos_dims must be >= 1; got 0"):
        sk.SALoss(4, pos_dims=0)
