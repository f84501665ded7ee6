"""The Triton kernels as the implementations of the op family of :mod:`salign_kernels.ops._library`.

They are registered for CUDA tensors under ``torch.ops.salign_kernels``, and, when the kernels run
in Triton's interpreter, for CPU tensors under the twin family ``torch.ops.salign_kernels_interpreter``
(the C++ kernels own the CPU tensors of the main family). Each implementation checks the op
contract, makes the tensors' device current, prepares each map once (scales, their derivative and
contiguous voxel-major rows: :mod:`.prepare`) and launches :mod:`.dense`, :mod:`.window` or
:mod:`.backward`; the fused loss op adds its reduction (:mod:`._loss`) to those launches.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..._numerics import accumulation_dtype
from .._library import INTERPRETER_NAMESPACE, op_family, register_kernels
from . import _loss
from . import backward as _backward
from . import dense as _dense
from . import window as _window
from ._runtime import (check_backward, check_forward, check_loss_backward, device_of, is_view_of, voxel_major,
                       without_fills)
from .prepare import forward_rows, prepare_pair, writes_rows

#: Whether the kernels run in Triton's interpreter (CPU tensors) rather than compiled for a GPU.
INTERPRETED = _dense.INTERPRETED


def _rows_and_scales(feat: torch.Tensor, normalize: bool):
    """A map's contiguous voxel-major rows ``(B, N, C)`` and scales ``(B, N)`` (``scale * rows =
    x_hat``): one pass."""
    return forward_rows(voxel_major(feat), normalize)


def _per_voxel(t: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
    return t.view(feat.shape[0], *feat.shape[2:])


def match(feat_a, feat_b, mask_a: Optional[torch.Tensor], mask_b: Optional[torch.Tensor], window: List[int],
          mode: int, normalize: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Best candidate of every query: dense (``window == []``) or windowed."""
    check_forward(feat_a, feat_b, mask_a, mask_b, window, mode)
    with device_of(feat_a):
        xa, scale_a = _rows_and_scales(feat_a, normalize)
        xb, scale_b = _rows_and_scales(feat_b, normalize)
        if not window:
            values, indices = _dense.dense_match_forward(xa, xb, scale_a, scale_b, mask_a, mask_b)
        else:
            values, indices = _window.window_match_forward(
                xa, xb, scale_a, scale_b, mask_a, mask_b, tuple(feat_a.shape[2:]), tuple(window), mode
            )
    return _per_voxel(values, feat_a), _per_voxel(indices, feat_a)


def match_symmetric(feat_a, feat_b, mask_a, mask_b, window: List[int], mode: int, normalize: bool):
    """Dense matching a -> b and b -> a: each map prepared once, then the two scans."""
    check_forward(feat_a, feat_b, mask_a, mask_b, window, mode)
    if window:
        raise ValueError(f"salign_kernels (triton): match_symmetric fuses dense matching only; got window {window}")
    with device_of(feat_a):
        xa, scale_a = _rows_and_scales(feat_a, normalize)
        xb, scale_b = _rows_and_scales(feat_b, normalize)
        out = _dense.dense_match_symmetric_forward(xa, xb, scale_a, scale_b, mask_a, mask_b)
    return tuple(_per_voxel(t, feat_a) for t in out)


def alignment_loss(feat_a, feat_b, mask_a, mask_b, window: List[int], mode: int, normalize: bool, symmetric: bool,
                   mean: bool):
    """The loss of :func:`salign_kernels.local_alignment_loss` (``"mean"`` or ``"sum"``) in one op:
    both maps prepared by one launch, one scan per direction whose final pass also writes the loss's
    partial sums, one program that finishes the loss. Returns the loss and what its backward reads
    (see ``salign_kernels.ops._library``)."""
    check_forward(feat_a, feat_b, mask_a, mask_b, window, mode)
    B, N = feat_a.shape[0], feat_a.shape[2:].numel()
    spatial = tuple(feat_a.shape[2:])
    directions = 2 if symmetric else 1
    acc = accumulation_dtype(feat_a.dtype)
    with device_of(feat_a):
        va, vb = voxel_major(feat_a), voxel_major(feat_b)
        write_a, write_b = writes_rows(va, normalize), writes_rows(vb, normalize)
        xa, factors_a, xb, factors_b = prepare_pair(va, vb, normalize, write_a, write_b)
        values = torch.empty((directions, B, N), dtype=acc, device=feat_a.device)
        indices = torch.empty((directions, B, N), dtype=torch.int64, device=feat_a.device)
        if window:
            slots = _window.loss_slots(spatial, B, feat_a.dtype)
        else:
            slots = _dense.loss_slots(N, B, feat_a.dtype)
        sums, counts = _loss.partial_buffers(directions, slots, acc, feat_a.device)
        passes = [(xa, xb, factors_a[0], factors_b[0], mask_a, mask_b),
                  (xb, xa, factors_b[0], factors_a[0], mask_b, mask_a)][:directions]
        for d, (x, y, scale_x, scale_y, mask_x, mask_y) in enumerate(passes):
            out, partials = (values[d], indices[d]), (sums[d], counts[d])
            if window:
                _window.window_match_forward(x, y, scale_x, scale_y, mask_x, mask_y, spatial, tuple(window), mode,
                                             partials=partials, out=out)
            else:
                _dense.dense_match_forward(x, y, scale_x, scale_y, mask_x, mask_y, partials=partials, out=out)
        loss, totals = _loss.finish_loss(sums, counts, mean)
    # A map that serves as its own rows is returned as an empty tensor (the backward reads the map);
    # two of them, as two tensors: a custom op's outputs may not alias one another.
    return (loss, values, indices, totals, xa if write_a else feat_a.new_empty((0,)), factors_a,
            xb if write_b else feat_b.new_empty((0,)), factors_b)


def alignment_loss_backward(grad_loss, feat_a, feat_b, values, indices, counts, rows_a, factors_a, rows_b, factors_b,
                            mean: bool):
    """Gradients of the fused loss w.r.t. both maps from what its forward saved: no map is read
    again but through its prepared rows."""
    check_loss_backward(grad_loss, feat_a, feat_b, values, indices, counts, rows_a, factors_a, rows_b, factors_b)
    directions = values.shape[0]
    with device_of(feat_a):
        grad_a, view_a = _gradient_of(feat_a)
        grad_b, view_b = _gradient_of(feat_b)
        prepared = []
        for feat, rows, factors in ((feat_a, rows_a, factors_a), (feat_b, rows_b, factors_b)):
            rows = rows if rows.numel() else voxel_major(feat)
            prepared.append(_backward.Prepared(rows, rows, factors[0], factors[1], factors[2]))
        gradients = [_backward.LossGradient(grad_loss, counts[d], values[d], directions == 2, mean)
                     for d in range(directions)]
        _backward.loss_backward(gradients, prepared[0], prepared[1], list(indices), view_a, view_b)
        _copy_back(grad_a, view_a)
        _copy_back(grad_b, view_b)
    return grad_a, grad_b


def _copy_back(grad: torch.Tensor, view: torch.Tensor) -> None:
    """Bring a gradient the kernels wrote to a temporary voxel-major ``view`` into ``grad``'s strides."""
    if not is_view_of(view, grad):
        B = grad.shape[0]
        grad.copy_(view.view(B, *grad.shape[2:], grad.shape[1]).permute(0, grad.dim() - 1, *range(1, grad.dim() - 1)))


def _gradient_of(feat: torch.Tensor):
    """``(grad, view)``: the gradient in ``feat``'s strides (``empty_like``, as the fake says) and
    the voxel-major view the kernels write, a temporary when ``grad``'s spatial axes do not flatten."""
    grad = torch.empty_like(feat)
    view = voxel_major(grad)
    return grad, view


def match_backward(grad_values, feat_a, feat_b, indices, normalize: bool):
    """Gradients of ``sum(grad_values * values)`` w.r.t. both maps, normalisation included."""
    check_backward(grad_values, feat_a, feat_b, indices)
    B = feat_a.shape[0]
    with device_of(feat_a):
        grad_a, view_a = _gradient_of(feat_a)
        grad_b, view_b = _gradient_of(feat_b)
        _backward.match_backward(
            grad_values.contiguous().view(B, -1), voxel_major(feat_a), voxel_major(feat_b),
            indices.contiguous().view(B, -1), normalize, view_a, view_b,
        )
        _copy_back(grad_a, view_a)
        _copy_back(grad_b, view_b)
    return grad_a, grad_b


#: The families the kernels implement: the main one on CUDA, its twin on CPU under the interpreter.
#: Their kernels write every element of the tensors they allocate: no deterministic-mode fills.
FAMILY = op_family()
IMPLEMENTATIONS = {name: without_fills(implementation) for name, implementation in dict(
    match=match, match_symmetric=match_symmetric, match_backward=match_backward,
    alignment_loss=alignment_loss, alignment_loss_backward=alignment_loss_backward).items()}
register_kernels(FAMILY, "cuda", **IMPLEMENTATIONS)
INTERPRETER_FAMILY = None
if INTERPRETED:
    INTERPRETER_FAMILY = op_family(INTERPRETER_NAMESPACE)
    register_kernels(INTERPRETER_FAMILY, "cpu", **IMPLEMENTATIONS)


def family_for(device: torch.device):
    """The op family whose kernels are these for tensors of ``device``."""
    return INTERPRETER_FAMILY if device.type == "cpu" else FAMILY
