"""The Triton backend: fused matching kernels for CUDA tensors (CPU tensors through the interpreter).

A backend module of :mod:`salign_kernels._backend`: ``name``, ``status()``, ``supports(device)``,
``match(...)`` and ``match_symmetric(...)``. The kernels live one op per file: :mod:`.dense` (the
streaming (max, argmax) over all candidates), :mod:`.window` (sliding and partition windows), :mod:`.backward` (gather/scatter
through the saved indices); :mod:`.library` registers them as the ``torch.ops.salign_triton`` ops.

Importing this package never fails: without Triton, ``status()`` says why and ``match`` raises.
CPU tensors run through Triton's interpreter only when ``TRITON_INTERPRET=1`` was set before the
package was imported (slow: for tests and debugging).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..._backend import BackendStatus
from .._common import op_arguments

name = "triton"

try:
    from . import library as _library
except Exception as exc:  # Triton missing or broken: the backend is unavailable, never an ImportError
    _library = None
    _IMPORT_ERROR: Optional[BaseException] = exc
else:
    _IMPORT_ERROR = None


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _library is not None and _library.INTERPRETED


def status() -> BackendStatus:
    """Available when Triton imports and there is a CUDA device or the interpreter is on."""
    if _library is None:
        reason = f"{type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}"
        return BackendStatus(False, f"triton is not importable ({reason})")
    if interpreted() or torch.cuda.is_available():
        return BackendStatus(True)
    return BackendStatus(
        False, "no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU tensors, slowly, for testing)"
    )


def supports(device) -> bool:
    """CUDA tensors; CPU tensors only under the interpreter."""
    device = torch.device(device)
    if _library is None:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and interpreted()


def match(feat_a, feat_b, window, mode, mask_a, mask_b, normalize):
    """Matching of :func:`salign_kernels.reference.match` by the Triton kernels; differentiable values.

    ``(B, C, H, W)`` features in -> ``(values, indices)`` ``(B, H, W)``: values float32 (float64
    for float64), indices int64 (-1 for an invalid query). See :mod:`.library` for the op.
    """
    if _library is None:
        raise RuntimeError(status().reason)
    return torch.ops.salign_triton.match_forward(
        *op_arguments(feat_a, feat_b, window, mode, mask_a, mask_b, normalize)
    )


#: The fused symmetric pass keeps per-row-block column partials; above this many bytes of them,
#: the two directions run as two one-way passes instead.
FUSED_SYMMETRIC_MAX_BYTES = 2**30


def match_symmetric(feat_a, feat_b, window, mode, mask_a, mask_b, normalize):
    """Both directions, ``[(values_ab, indices_ab), (values_ba, indices_ba)]``.

    Dense matching takes both from one pass over the similarity tiles (the b -> a maxima are
    column maxima of the same tiles) while its partials stay under
    :data:`FUSED_SYMMETRIC_MAX_BYTES`; windowed matching, and larger problems, run two passes.
    """
    if _library is None:
        raise RuntimeError(status().reason)
    B, _, H, W = feat_a.shape
    fused = window is None and (
        _library.symmetric_partial_bytes(B, H * W, feat_a.dtype) <= FUSED_SYMMETRIC_MAX_BYTES
    )
    if not fused:
        return [
            match(feat_a, feat_b, window, mode, mask_a, mask_b, normalize),
            match(feat_b, feat_a, window, mode, mask_b, mask_a, normalize),
        ]
    xa, xb, ma, mb, _, _, normalize = op_arguments(feat_a, feat_b, window, mode, mask_a, mask_b, normalize)
    values_ab, indices_ab, values_ba, indices_ba = torch.ops.salign_triton.match_symmetric_forward(xa, xb, ma, mb, normalize)
    return [(values_ab, indices_ab), (values_ba, indices_ba)]
