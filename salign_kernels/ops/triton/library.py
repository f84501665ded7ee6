"""The Triton kernels as the implementations of the op family of :mod:`salign_kernels.ops._library`.

They are registered for CUDA tensors under ``torch.ops.salign_kernels``, and, when the kernels run
in Triton's interpreter, for CPU tensors under the twin family ``torch.ops.salign_kernels_interpreter``
(the C++ kernels own the CPU tensors of the main family). Each implementation checks the op
contract, makes the tensors' device current, prepares each map once (scales, their derivative and
contiguous voxel-major rows: :mod:`.prepare`) and launches :mod:`.dense`, :mod:`.window` or
:mod:`.backward`.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .._library import INTERPRETER_NAMESPACE, op_family, register_kernels
from . import backward as _backward
from . import dense as _dense
from . import window as _window
from ._runtime import check_backward, check_forward, device_of, is_view_of, voxel_major
from .prepare import forward_rows

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
        for grad, view in ((grad_a, view_a), (grad_b, view_b)):
            if not is_view_of(view, grad):  # written to a temporary: bring it into grad's strides
                grad.copy_(view.view(B, *grad.shape[2:], grad.shape[1]).permute(0, grad.dim() - 1, *range(1, grad.dim() - 1)))
    return grad_a, grad_b


#: The families the kernels implement: the main one on CUDA, its twin on CPU under the interpreter.
FAMILY = op_family()
register_kernels(FAMILY, "cuda", match, match_symmetric, match_backward)
INTERPRETER_FAMILY = None
if INTERPRETED:
    INTERPRETER_FAMILY = op_family(INTERPRETER_NAMESPACE)
    register_kernels(INTERPRETER_FAMILY, "cpu", match, match_symmetric, match_backward)


def family_for(device: torch.device):
    """The op family whose kernels are these for tensors of ``device``."""
    return INTERPRETER_FAMILY if device.type == "cpu" else FAMILY
