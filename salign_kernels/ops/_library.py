"""The op family every compiled backend implements, defined once: schemas, fake implementations and
autograd of ``torch.ops.salign_kernels.match``, ``match_symmetric`` and ``match_backward``.

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

Gradient (all backends): with ``q = indices[p]``, ``g_p = grad_values[p]`` for valid p, and
``r = 1 / max(||x||, eps)``, ``d x / d x_hat`` applied by the chain rule
``d/dx = r (d/dx_hat - x_hat <x_hat, d/dx_hat>)`` (without the projection where the norm is clamped),

    d/dxa_hat_p = g_p xb_hat_q        d/dxb_hat_q = sum_{p: indices[p] = q} g_p xa_hat_p.
"""

from __future__ import annotations

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
}


class OpFamily(NamedTuple):
    """The three ops of one namespace (``torch.ops.<namespace>.*``)."""

    namespace: str
    match: object
    match_symmetric: object
    match_backward: object


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
        ops = getattr(torch.ops, namespace)
        family = OpFamily(namespace, ops.match, ops.match_symmetric, ops.match_backward)
        _register_autograd(family)
        _FAMILIES[namespace] = family
    return _FAMILIES[namespace]


def register_kernels(family: OpFamily, device_type: str, match, match_symmetric, match_backward) -> None:
    """Register Python implementations of the three ops for tensors of ``device_type``."""
    ns = family.namespace
    torch.library.register_kernel(f"{ns}::match", device_type, match)
    torch.library.register_kernel(f"{ns}::match_symmetric", device_type, match_symmetric)
    torch.library.register_kernel(f"{ns}::match_backward", device_type, match_backward)


def call_match(family: OpFamily, feat_a: torch.Tensor, feat_b: torch.Tensor, m: Matching):
    """One direction through the family's ``match`` op: ``(values, indices)``."""
    return family.match(feat_a, feat_b, m.mask_a, m.mask_b, m.op_window(), m.op_mode(), m.normalize)


def call_match_symmetric(family: OpFamily, feat_a: torch.Tensor, feat_b: torch.Tensor, m: Matching) -> List:
    """Both directions through the family's fused op: ``[(values_ab, indices_ab), (values_ba, indices_ba)]``."""
    values_ab, indices_ab, values_ba, indices_ba = family.match_symmetric(
        feat_a, feat_b, m.mask_a, m.mask_b, m.op_window(), m.op_mode(), m.normalize
    )
    return [(values_ab, indices_ab), (values_ba, indices_ba)]
