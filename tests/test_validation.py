"""Every bad input of the specification raises at once, naming the argument and the value received."""

from __future__ import annotations

import re

import pytest
import torch

import salign_kernels as sk
from salign_kernels import _backend
from helpers import make_features

SHAPE = (2, 3, 5, 6)


@pytest.fixture
def feats():
    return make_features(SHAPE)


# Each public entry point that takes two feature maps, called with its defaults.
MATCHERS = {
    "dense_match": lambda a, b, **kw: sk.dense_match(a, b, **kw),
    "window_match": lambda a, b, **kw: sk.window_match(a, b, kw.pop("window", 3), **kw),
    "local_alignment_loss": lambda a, b, **kw: sk.local_alignment_loss(a, b, **kw),
    "LocalAlignmentLoss": lambda a, b, **kw: sk.LocalAlignmentLoss()(a, b, **kw),
}


@pytest.fixture(params=list(MATCHERS))
def call(request):
    return MATCHERS[request.param]


def test_features_must_be_tensors(call, feats):
    with pytest.raises(TypeError, match=r"feat_a must be a torch.Tensor; got \[1, 2\] \(list\)"):
        call([1, 2], feats[1])
    with pytest.raises(TypeError, match=r"feat_b must be a torch.Tensor; got None"):
        call(feats[0], None)


@pytest.mark.parametrize("shape", [(3, 5, 6), (1, 2, 3, 4, 5, 6), (30,)])
def test_wrong_rank(call, shape):
    message = (r"feat_a must be a 4-D tensor \(B, C, H, W\) or a 5-D tensor \(B, C, D, H, W\); got .* of shape "
               + re.escape(str(tuple(shape))))
    with pytest.raises(ValueError, match=message):
        call(torch.zeros(shape), torch.zeros(shape))


def test_wrong_rank_names_feat_b(call, feats):
    with pytest.raises(ValueError, match=r"feat_b must be a 4-D tensor"):
        call(feats[0], feats[1][0])


def test_a_slice_and_a_volume_differ_in_shape(call, feats):
    with pytest.raises(ValueError, match=r"same shape; got \(2, 3, 5, 6\) and \(2, 3, 1, 5, 6\)"):
        call(feats[0], feats[1][:, :, None])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_floating_dtype(call, dtype):
    x = torch.zeros(SHAPE, dtype=dtype)
    with pytest.raises(TypeError, match=rf"feat_a must have a floating dtype .*; got {dtype}"):
        call(x, x)


def test_shapes_differ(call, feats):
    with pytest.raises(ValueError, match=r"same shape; got \(2, 3, 5, 6\) and \(2, 3, 5, 7\)"):
        call(feats[0], torch.zeros(2, 3, 5, 7))


def test_dtypes_differ(call, feats):
    with pytest.raises(TypeError, match=r"same dtype; got torch.float32 and torch.float64"):
        call(feats[0], feats[1].double())


def test_devices_differ(call, feats):
    with pytest.raises(ValueError, match=r"same device; got cpu and meta"):
        call(feats[0], feats[1].to("meta"))


@pytest.mark.parametrize("shape", [(0, 3, 5, 6), (2, 0, 5, 6), (2, 3, 0, 6), (2, 3, 5, 0)])
def test_zero_size(call, shape):
    with pytest.raises(ValueError, match=r"feat_a must not be empty; got .*shape"):
        call(torch.zeros(shape), torch.zeros(shape))


@pytest.mark.parametrize("name", ["mask_a", "mask_b"])
def test_mask_wrong_dtype(call, feats, name):
    with pytest.raises(TypeError, match=rf"{name} must have dtype torch.bool; got torch.float32"):
        call(*feats, **{name: torch.ones(2, 5, 6)})


@pytest.mark.parametrize("name", ["mask_a", "mask_b"])
def test_mask_wrong_type(call, feats, name):
    with pytest.raises(TypeError, match=rf"{name} must be a bool torch.Tensor or None; got True"):
        call(*feats, **{name: True})


@pytest.mark.parametrize("name", ["mask_a", "mask_b"])
@pytest.mark.parametrize("shape", [(2, 6, 5), (1, 5, 6), (2, 1, 5, 6), (5, 6)])
def test_mask_wrong_shape(call, feats, name, shape):
    with pytest.raises(ValueError, match=rf"{name} must have shape \(B, H, W\) = \(2, 5, 6\); got"):
        call(*feats, **{name: torch.ones(shape, dtype=torch.bool)})


@pytest.mark.parametrize("name", ["mask_a", "mask_b"])
@pytest.mark.parametrize("shape", [(2, 5, 6), (2, 4, 1, 6), (2, 4, 5, 6, 1)])
def test_mask_wrong_shape_3d(call, name, shape):
    a, b = make_features((2, 3, 4, 5, 6))
    with pytest.raises(ValueError, match=rf"{name} must have shape \(B, D, H, W\) = \(2, 4, 5, 6\); got"):
        call(a, b, **{name: torch.ones(shape, dtype=torch.bool)})


@pytest.mark.parametrize("name", ["mask_a", "mask_b"])
def test_mask_wrong_device(call, feats, name):
    with pytest.raises(ValueError, match=rf"{name} must be on the features' device cpu; got meta"):
        call(*feats, **{name: torch.ones(2, 5, 6, dtype=torch.bool, device="meta")})


@pytest.mark.parametrize("fn", ["dense_match", "window_match", "local_alignment_loss"])
def test_normalize_must_be_bool(feats, fn):
    with pytest.raises(TypeError, match=r"normalize must be a bool; got 1 \(int\)"):
        MATCHERS[fn](*feats, normalize=1)


def test_symmetric_must_be_bool(feats):
    with pytest.raises(TypeError, match=r"symmetric must be a bool; got 'yes' \(str\)"):
        sk.local_alignment_loss(*feats, symmetric="yes")


# --- window ---------------------------------------------------------------------------------------


def window_callers():
    return {
        "window_match": lambda a, b, window, mode="sliding": sk.window_match(a, b, window, mode=mode),
        "local_alignment_loss": lambda a, b, window, mode="sliding": sk.local_alignment_loss(
            a, b, window=window, window_mode=mode
        ),
    }


@pytest.mark.parametrize("caller", list(window_callers()))
@pytest.mark.parametrize("window", [0, -3])
def test_window_below_one(feats, caller, window):
    with pytest.raises(ValueError, match=rf"window must be >= 1 \(use window=None for dense matching\); got {window}"):
        window_callers()[caller](*feats, window)


@pytest.mark.parametrize("caller", list(window_callers()))
@pytest.mark.parametrize("mode", ["sliding", "partition"])
def test_window_larger_than_the_map(feats, caller, mode):
    with pytest.raises(ValueError, match=r"window must be at most max\(H, W\) = 6 .*; got 7"):
        window_callers()[caller](*feats, 7, mode)


@pytest.mark.parametrize("caller", list(window_callers()))
def test_even_window_in_sliding_mode(feats, caller):
    with pytest.raises(ValueError, match=r"window must be odd in sliding mode .*; got 4"):
        window_callers()[caller](*feats, 4)
    window_callers()[caller](*feats, 4, "partition")  # allowed


@pytest.mark.parametrize("caller", list(window_callers()))
@pytest.mark.parametrize("window", [3.0, "3", True])
def test_window_not_an_int(feats, caller, window):
    with pytest.raises(TypeError, match=r"window must be an int, a tuple of ints .* or None \(dense matching\); got"):
        window_callers()[caller](*feats, window)


def test_window_match_needs_a_window(feats):
    with pytest.raises(TypeError, match=r"window must be an int, a tuple of ints"):
        sk.window_match(*feats, 3.5)
    with pytest.raises(ValueError, match=r"window must be an int or a tuple of ints for window_match; got None"):
        sk.window_match(*feats, None)


VOLUME = (2, 3, 4, 5, 6)


@pytest.mark.parametrize("caller", list(window_callers()))
@pytest.mark.parametrize("window", [(3, 3), (1, 3, 3, 3)])
def test_window_tuple_of_the_wrong_length(caller, window):
    a, b = make_features(VOLUME)
    pattern = r"window must have one size per spatial axis"
    with pytest.raises(ValueError, match=pattern):
        window_callers()[caller](a, b, window)


@pytest.mark.parametrize("caller", list(window_callers()))
def test_window_tuple_of_the_wrong_length_for_slices(feats, caller):
    with pytest.raises(ValueError, match=r"window must have one size per spatial axis \(H, W\), 2 in all, .*got \(1, 3, 3\)"):
        window_callers()[caller](*feats, (1, 3, 3))


@pytest.mark.parametrize("caller", list(window_callers()))
@pytest.mark.parametrize("window", [(1, 3.0, 3), (1, "3", 3), (1, True, 3)])
def test_window_tuple_with_a_non_int(caller, window):
    a, b = make_features(VOLUME)
    with pytest.raises(TypeError, match=r"window must be an int or a tuple of ints \(one per spatial axis\); got"):
        window_callers()[caller](a, b, window)


@pytest.mark.parametrize("caller", list(window_callers()))
def test_window_tuple_even_in_sliding_mode(caller):
    a, b = make_features(VOLUME)
    with pytest.raises(ValueError, match=r"window must be odd in sliding mode .*; got \(1, 4, 3\)"):
        window_callers()[caller](a, b, (1, 4, 3))
    window_callers()[caller](a, b, (1, 4, 3), "partition")  # allowed


@pytest.mark.parametrize("caller", list(window_callers()))
@pytest.mark.parametrize("window", [(1, 0, 3), (0, 3, 3)])
def test_window_tuple_below_one(caller, window):
    a, b = make_features(VOLUME)
    with pytest.raises(ValueError, match=r"window must be >= 1"):
        window_callers()[caller](a, b, window, "partition")


@pytest.mark.parametrize("caller", list(window_callers()))
def test_window_larger_than_the_volume(caller):
    a, b = make_features(VOLUME)
    with pytest.raises(ValueError, match=r"window must be at most max\(D, H, W\) = 6 .* size 4 x 5 x 6; got \(7, 1, 1\)"):
        window_callers()[caller](a, b, (7, 1, 1))
    window_callers()[caller](a, b, (5, 1, 1))  # larger than D, within the largest axis: allowed


@pytest.mark.parametrize("caller", list(window_callers()))
def test_unknown_window_mode(feats, caller):
    with pytest.raises(ValueError, match=r"window_mode must be one of 'sliding', 'partition'; got 'tiles'"):
        window_callers()[caller](*feats, 3, "tiles")


# --- reduction and backend -------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["avg", "", None])
def test_unknown_reduction(feats, reduction):
    with pytest.raises(ValueError, match=rf"reduction must be one of 'none', 'mean', 'sum'; got {reduction!r}"):
        sk.local_alignment_loss(*feats, reduction=reduction)
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        sk.LocalAlignmentLoss(reduction=reduction)
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        sk.global_positional_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), reduction=reduction)


@pytest.mark.parametrize("fn", list(MATCHERS)[:3])
def test_unknown_backend(feats, fn):
    with pytest.raises(ValueError, match=r"backend must be one of 'auto', 'reference', 'cpp', 'triton'; got 'cuda'"):
        MATCHERS[fn](*feats, backend="cuda")


def test_unavailable_backend_raises(feats, monkeypatch):
    unavailable = (None, _backend.BackendStatus(False, "the extension was not built"))
    monkeypatch.setattr(_backend, "_load", lambda name: unavailable)
    with pytest.raises(sk.BackendUnavailableError, match=r"backend='cpp' is not available: the extension was not built"):
        sk.dense_match(*feats, backend="cpp")
    with pytest.raises(ValueError, match=r"backend='triton' is not available"):
        sk.local_alignment_loss(*feats, backend="triton")


def test_backend_on_a_device_it_does_not_run_on(feats, monkeypatch):
    gpu_only = type("GpuOnly", (), {"supports": staticmethod(lambda device: device.type == "cuda")})
    monkeypatch.setattr(_backend, "_load", lambda name: (gpu_only, _backend.BackendStatus(True)))
    with pytest.raises(sk.BackendUnavailableError, match=r"backend='triton' does not run on cpu tensors"):
        sk.dense_match(*feats, backend="triton")


# --- module options -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(window=0), ValueError, r"window must be >= 1"),
        (dict(window=4), ValueError, r"window must be odd in sliding mode"),
        (dict(window=2.0), TypeError, r"window must be an int, a tuple of ints"),
        (dict(window=(3, 3, 3, 3)), ValueError, r"window must have one size per spatial axis, 2 \(H, W\) or 3"),
        (dict(window=(1, 2, 3)), ValueError, r"window must be odd in sliding mode"),
        (dict(window=(1, 3.0)), TypeError, r"window must be an int or a tuple of ints"),
        (dict(window_mode="grid"), ValueError, r"window_mode must be one of .*; got 'grid'"),
        (dict(symmetric=None), TypeError, r"symmetric must be a bool; got None"),
        (dict(normalize="no"), TypeError, r"normalize must be a bool; got 'no'"),
        (dict(backend="gpu"), ValueError, r"backend must be one of .*; got 'gpu'"),
    ],
)
def test_local_alignment_loss_module_checks_options_in_init(kwargs, error, message):
    with pytest.raises(error, match=message):
        sk.LocalAlignmentLoss(**kwargs)
    with pytest.raises(error, match=message):
        sk.SALoss(8, **kwargs)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(gp_weight=-1.0), ValueError, r"gp_weight must be a finite number >= 0; got -1.0"),
        (dict(gp_weight=float("nan")), ValueError, r"gp_weight must be a finite number >= 0; got nan"),
        (dict(gp_weight="1"), TypeError, r"gp_weight must be a float; got '1' \(str\)"),
        (dict(reduction="none"), ValueError, r"reduction must be one of 'mean', 'sum'; got 'none'"),
        (dict(hidden=0), ValueError, r"hidden must be >= 1; got 0"),
    ],
)
def test_sa_loss_checks_options_in_init(kwargs, error, message):
    with pytest.raises(error, match=message):
        sk.SALoss(8, **kwargs)


@pytest.mark.parametrize(
    "in_channels,error,message",
    [(0, ValueError, r"in_channels must be >= 1; got 0"), (2.5, TypeError, r"in_channels must be an int; got 2.5")],
)
def test_positional_head_checks_channels(in_channels, error, message):
    with pytest.raises(error, match=message):
        sk.GlobalPositionalHead(in_channels)


def test_positional_head_checks_the_features():
    head = sk.GlobalPositionalHead(4)
    with pytest.raises(ValueError, match=r"feat_a must have in_channels=4 channels; got shape \(2, 3, 5, 6\)"):
        head(*make_features(SHAPE))
    with pytest.raises(ValueError, match=r"feat_a must be a 4-D tensor"):
        head(torch.zeros(2, 4), torch.zeros(2, 4))


# --- positional loss ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,error,message",
    [
        ((None, torch.zeros(2), torch.zeros(2)), TypeError, r"pred must be a torch.Tensor; got None"),
        ((torch.zeros(2), [0.0, 1.0], torch.zeros(2)), TypeError, r"pos_a must be a torch.Tensor; got \[0.0, 1.0\]"),
        ((torch.zeros(2), torch.zeros(2), torch.zeros(2, dtype=torch.long)), TypeError, r"pos_b must have a floating dtype; got torch.int64"),
        ((torch.zeros(2, 1), torch.zeros(2), torch.zeros(2)), ValueError, r"pos_a must have the shape of pred \(2, 1\); got \(2,\)"),
        ((torch.zeros(2, 3, 1), torch.zeros(2, 3, 1), torch.zeros(2, 3, 1)), ValueError,
         r"pred must be a non-empty \(B,\) or \(B, K\) tensor"),
        ((torch.zeros(0), torch.zeros(0), torch.zeros(0)), ValueError, r"pred must be a non-empty \(B,\) or \(B, K\)"),
        ((torch.zeros(2), torch.zeros(3), torch.zeros(2)), ValueError, r"pos_a must have the shape of pred \(2,\); got \(3,\)"),
        ((torch.zeros(2), torch.zeros(2), torch.zeros(2, device="meta")), ValueError, r"pos_b must be on pred's device cpu; got meta"),
    ],
)
def test_positional_loss_bad_input(args, error, message):
    with pytest.raises(error, match=message):
        sk.global_positional_loss(*args)


def test_errors_change_nothing(feats):
    a, b = feats
    before = (a.clone(), b.clone())
    with pytest.raises(ValueError):
        sk.local_alignment_loss(a, b, window=99)
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
