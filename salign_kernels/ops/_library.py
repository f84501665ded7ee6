"""The op family every compiled backend implements, defined once: schemas, fake implementations and
autograd of ``torch.ops.salign_kernels.match``, ``match_symmetric`` and ``match_backward``, and of
the fused loss ``alignment_loss`` with its ``alignment_loss_backward``.

The C++ kernels register themselves for CPU tensors (``TORCH_LIBRARY_IMPL`` in
``salign_kernels/csrc/ops.cpp``), the Triton launchers for CUDA tensors
(:mod:`salign_kernels.ops.triton.library`), the way pytorch/extension-cpp pairs ``csrc/cpu`` and
``csrc/cuda`` kernels under one op. The schemas live
here, in Python, so that either backend works without the other (a GPU machine without the C++
build, a CPU machine without Triton).

Under Triton's interpreter (``TRITON_INTERPRET=1``, tests and debugging) the Triton kernels run on
CPU tensors, whose dispatch key the C++ kernels own; they register under a twin of the family,
:data:`INTERPRETER_NAMESPACE`, made by the same :func:`op_family` (one schema, fake and autograd).

The op contract
---------------
Features ``(B, C, *spatial)``, ``spatial = (H, W)`` or ``(D, H, W)``, of a supported float dtype, in
any memory layout (contiguous, channels-last, strided views: the kernels read them through their
strides). Voxels flatten row-major, ``N = prod(spatial)``.

``match(feat_a, feat_b, mask_a, mask_b, window, mode, normalize) -> (values, indices)``
    ``window``: ``[]`` for dense matching, else one size per spatial axis; ``mode``:
    :data:`~salign_kernels._matching.WINDOW_MODE_CODES`. Masks: None or bool ``(B, *spatial)``.
    With ``x_hat = x / max(||x||, eps)`` when ``normalize`` (else ``x``),
    ``s(p, q) = <xa_hat_p, xb_hat_q>``, ``values[p] = max s(p, q)`` over the candidates of the
    specification and ``indices[p]`` the lowest flat q attaining it; ``-1`` and ``0`` for an
    invalid query. Values in the accumulation dtype, indices int64, both ``(B, *spatial)``.
``match_symmetric(...same...) -> (values_ab, indices_ab, values_ba, indices_ba)``
    Both directions (b -> a: queries in b, candidates in a, masks swapped) from one pass, for the
    problems where the backend's ``fuses_symmetric`` says so.
``match_backward(grad_values, feat_a, feat_b, indices, normalize) -> (grad_a, grad_b)``
    The gradient of ``sum(grad_values * values)`` with respect to both feature maps through the
    saved indices, the normalisation's chain rule included; in the features' dtypes, shapes and
    strides (``torch.empty_like``).

``alignment_loss(...same..., symmetric, mean) -> (loss, values, indices, counts, rows_a, factors_a, rows_b, factors_b)``
    The LA/WLA loss of :func:`salign_kernels.local_alignment_loss` in one op, for backends whose
    kernels reduce it themselves (the Triton kernels): ``loss`` (0-dim, accumulation dtype) is
    ``"mean"`` (``mean``) or ``"sum"`` of ``|1 - values|`` over the valid queries, per direction,
    averaged over the ``D`` directions (2 when ``symmetric``: b -> a second). The rest is what its
    backward reads, not differentiable: ``values``, ``indices`` ``(D, B, N)``, ``counts`` ``(D,)``
    int64 (valid queries per direction), and per map its prepared voxel-major rows (``(B, N, C)``
    contiguous in the map's dtype, or ``(0,)`` when the map itself serves:
    :func:`prepared_rows_shape`) and ``factors`` ``(3, B, N)``: the scale with ``scale * rows =
    x_hat``, ``r = 1 / max(||x||, eps)`` and ``proj`` (1 where the norm is not clamped).
``alignment_loss_backward(grad_loss, feat_a, feat_b, values, indices, counts, rows_a, factors_a, rows_b, factors_b, mean) -> (grad_a, grad_b)``
    Its gradient: ``match_backward`` of each direction with ``grad_values[p] = -((g / D / max(n,
    1)) * sgn(1 - values[p]))`` at valid queries (the divisions where they apply; ``sgn(NaN) = 0``,
    as PyTorch's), summed over the directions.

Gradient (all backends): with ``q = indices[p]``, ``g_p = grad_values[p]`` for valid p, and
``r = 1 / max(||x||, eps)``, ``d x / d x_hat`` applied by the chain rule
``d/dx = r (d/dx_hat - x_hat <x_hat, d/dx_hat>)`` (without the projection where the norm is clamped),

    d/dxa_hat_p = g_p xb_hat_q        d/dxb_hat_q = sum_{p: indices[p] = q} g_p xa_hat_p.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple

import torch

from .._matching import Matching
from .._numerics import accumulation_dtype

NAMESPACE = "salign_kernels"
#: The twin family the Triton kernels register under for CPU tensors when interpreted.
INTERPRETER_NAMESPACE = "salign_kernels_interpreter"

_ARGUMENTS = "Tensor feat_a, Tensor feat_b, Tensor? mask_a, Tensor? mask_b, int[] window, int mode, bool normalize"
SCHEMAS = {
    "match": f"({_ARGUMENTS}) -> (Tensor, Tensor)",
    "match_symmetric": f"({_ARGUMENTS}) -> (Tensor, Tensor, Tensor, Tensor)",
    "match_backward": (
        "(Tensor grad_values, Tensor feat_a, Tensor feat_b, Tensor indices, bool normalize) -> (Tensor, Tensor)"
    ),
    "alignment_loss": (
        f"({_ARGUMENTS}, bool symmetric, bool mean) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "alignment_loss_backward": (
        "(Tensor grad_loss, Tensor feat_a, Tensor feat_b, Tensor values, Tensor indices, Tensor counts, "
        "Tensor rows_a, Tensor factors_a, Tensor rows_b, Tensor factors_b, bool mean) -> (Tensor, Tensor)"
    ),
}
#: The fused loss op's outputs after the loss, saved for its backward (not differentiable).
LOSS_SAVED = ("values", "indices", "counts", "rows_a", "factors_a", "rows_b", "factors_b")


class OpFamily(NamedTuple):
    """The ops of one namespace (``torch.ops.<namespace>.*``)."""

    namespace: str
    match: object
    match_symmetric: object
    match_backward: object
    alignment_loss: object
    alignment_loss_backward: object


_FAMILIES = {}
_LIBRARIES = []  # keeps the torch.library.Library objects (and so the definitions) alive


def _per_voxel_like(feat: torch.Tensor):
    """Uninitialised ``(values, indices)`` of a query map ``feat``: ``(B, *spatial)`` each."""
    shape = (feat.shape[0], *feat.shape[2:])
    return feat.new_empty(shape, dtype=accumulation_dtype(feat.dtype)), feat.new_empty(shape, dtype=torch.int64)


def _fake_match(feat_a, feat_b, mask_a, mask_b, window, mode, normalize):
    return _per_voxel_like(feat_a)


def _fake_match_symmetric(feat_a, feat_b, mask_a, mask_b, window, mode, normalize):
    return (*_per_voxel_like(feat_a), *_per_voxel_like(feat_b))


def _fake_match_backward(grad_values, feat_a, feat_b, indices, normalize):
    return torch.empty_like(feat_a), torch.empty_like(feat_b)


def rows_written(normalize: bool, channels: int, channel_stride: int) -> bool:
    """Whether a map's prepared voxel-major rows are a new contiguous ``(B, N, C)`` tensor rather
    than the map itself: when normalising (the rows are ``u x``), or when its channels are not
    innermost."""
    return bool(normalize) or (channels > 1 and channel_stride != 1)


def prepared_rows_shape(feat: torch.Tensor, normalize: bool):
    """The shape of a map's ``rows`` output of ``alignment_loss``: ``(B, N, C)`` when the forward
    writes them (:func:`rows_written`), else ``(0,)`` (the map itself serves)."""
    B, C = feat.shape[:2]
    if rows_written(normalize, C, feat.stride(1)):
        return (B, math.prod(feat.shape[2:]), C)
    return (0,)


def _fake_alignment_loss(feat_a, feat_b, mask_a, mask_b, window, mode, normalize, symmetric, mean):
    B, N = feat_a.shape[0], math.prod(feat_a.shape[2:])
    directions = 2 if symmetric else 1
    acc = accumulation_dtype(feat_a.dtype)
    return (
        feat_a.new_empty((), dtype=acc),
        feat_a.new_empty((directions, B, N), dtype=acc),
        feat_a.new_empty((directions, B, N), dtype=torch.int64),
        feat_a.new_empty((directions,), dtype=torch.int64),
        feat_a.new_empty(prepared_rows_shape(feat_a, normalize)),
        feat_a.new_empty((3, B, N), dtype=acc),
        feat_b.new_empty(prepared_rows_shape(feat_b, normalize)),
        feat_b.new_empty((3, B, N), dtype=acc),
    )


def _fake_alignment_loss_backward(grad_loss, feat_a, feat_b, values, indices, counts, rows_a, factors_a, rows_b,
                                  factors_b, mean):
    return torch.empty_like(feat_a), torch.empty_like(feat_b)


def _register_autograd(family: OpFamily) -> None:
    """Values are differentiable in both feature maps, indices are not; the backward reads only the
    saved features and indices. The backward op itself has no derivative (a double backward raises)."""
    backward_op = family.match_backward
    options = 5  # mask_a, mask_b, window, mode, normalize

    def setup_one(ctx, inputs, output):
        ctx.normalize = inputs[-1]
        ctx.save_for_backward(inputs[0], inputs[1], output[1])
        ctx.mark_non_differentiable(output[1])

    def backward_one(ctx, grad_values, _grad_indices):
        feat_a, feat_b, indices = ctx.saved_tensors
        grad_a, grad_b = backward_op(grad_values.contiguous(), feat_a, feat_b, indices, ctx.normalize)
        return (grad_a, grad_b) + (None,) * options

    def setup_both(ctx, inputs, output):
        ctx.normalize = inputs[-1]
        ctx.save_for_backward(inputs[0], inputs[1], output[1], output[3])
        ctx.mark_non_differentiable(output[1], output[3])

    def backward_both(ctx, grad_ab, _grad_indices_ab, grad_ba, _grad_indices_ba):
        # b -> a is the one-way backward with the roles of a and b swapped; the two add up.
        feat_a, feat_b, indices_ab, indices_ba = ctx.saved_tensors
        ga, gb = backward_op(grad_ab.contiguous(), feat_a, feat_b, indices_ab, ctx.normalize)
        gb2, ga2 = backward_op(grad_ba.contiguous(), feat_b, feat_a, indices_ba, ctx.normalize)
        return (ga + ga2, gb + gb2) + (None,) * options

    loss_backward_op = family.alignment_loss_backward

    def setup_loss(ctx, inputs, output):
        ctx.mean = inputs[-1]
        ctx.save_for_backward(inputs[0], inputs[1], *output[1:])
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero gradients made for the saved outputs: a kernel each

    def backward_loss(ctx, grad_loss, *_grads_of_saved):
        if grad_loss is None:  # no gradient reached the loss (e.g. a probe of gradcheck's)
            return (None,) * (options + 4)
        grad_a, grad_b = loss_backward_op(grad_loss.contiguous(), *ctx.saved_tensors, ctx.mean)
        return (grad_a, grad_b) + (None,) * (options + 2)

    def setup_backward(ctx, inputs, output):
        pass

    def no_double_backward(ctx, *grads):
        raise RuntimeError(
            f"{family.namespace}::match_backward has no derivative: the matching losses support first-order "
            "gradients only (a double backward, e.g. torch.autograd.grad(..., create_graph=True) followed by "
            "another backward through it, is not implemented)"
        )

    ns = family.namespace
    torch.library.register_autograd(f"{ns}::match", backward_one, setup_context=setup_one)
    torch.library.register_autograd(f"{ns}::match_symmetric", backward_both, setup_context=setup_both)
    torch.library.register_autograd(f"{ns}::match_backward", no_double_backward, setup_context=setup_backward)
    torch.library.register_autograd(f"{ns}::alignment_loss", backward_loss, setup_context=setup_loss)
    torch.library.register_autograd(f"{ns}::alignment_loss_backward", no_double_backward,
                                    setup_context=setup_backward)


def op_family(namespace: str = NAMESPACE) -> OpFamily:
    """The op family of ``namespace``, defined on first use: schemas, fakes, autograd."""
    if namespace not in _FAMILIES:
        library = torch.library.Library(namespace, "FRAGMENT")
        _LIBRARIES.append(library)
        for name, schema in SCHEMAS.items():
            library.define(name + schema)
        torch.library.register_fake(f"{namespace}::match", _fake_match, lib=library)
        torch.library.register_fake(f"{namespace}::match_symmetric", _fake_match_symmetric, lib=library)
        torch.library.register_fake(f"{namespace}::match_backward", _fake_match_backward, lib=library)
        torch.library.register_fake(f"{namespace}::alignment_loss", _fake_alignment_loss, lib=library)
        torch.library.register_fake(f"{namespace}::alignment_loss_backward", _fake_alignment_loss_backward,
                                    lib=library)
        ops = getattr(torch.ops, namespace)
        family = OpFamily(namespace, ops.match, ops.match_symmetric, ops.match_backward, ops.alignment_loss,
                          ops.alignment_loss_backward)
        _register_autograd(family)
        _FAMILIES[namespace] = family
    return _FAMILIES[namespace]


def register_kernels(family: OpFamily, device_type: str, **implementations) -> None:
    """Register Python implementations of ops of the family (by name) for tensors of ``device_type``."""
    for name, implementation in implementations.items():
        torch.library.register_kernel(f"{family.namespace}::{name}", device_type, implementation)


def call_match(family: OpFamily, feat_a: torch.Tensor, feat_b: torch.Tensor, m: Matching):
    """One direction through the family's ``match`` op: ``(values, indices)``."""
    return family.match(feat_a, feat_b, m.mask_a, m.mask_b, m.op_window(), m.op_mode(), m.normalize)


def call_alignment_loss(family: OpFamily, feat_a: torch.Tensor, feat_b: torch.Tensor, m: Matching,
                        symmetric: bool, mean: bool) -> torch.Tensor:
    """The fused loss through the family's ``alignment_loss`` op: the scalar (its first output)."""
    return family.alignment_loss(feat_a, feat_b, m.mask_a, m.mask_b, m.op_window(), m.op_mode(), m.normalize,
                                 symmetric, mean)[0]


def call_match_symmetric(family: OpFamily, feat_a: torch.Tensor, feat_b: torch.Tensor, m: Matching) -> List:
    """Both directions through the family's fused op: ``[(values_ab, indices_ab), (values_ba, indices_ba)]``."""
    values_ab, indices_ab, values_ba, indices_ba = family.match_symmetric(
        feat_a, feat_b, m.mask_a, m.mask_b, m.op_window(), m.op_mode(), m.normalize
    )
    return [(values_ab, indices_ab), (values_ba, indices_ba)]
