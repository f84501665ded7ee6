"""The Triton backend: fused matching kernels for CUDA tensors (CPU tensors through the interpreter).

A backend module of :mod:`salign_kernels._backend`. The kernels live one op per file: :mod:`.dense`
(the streaming (max, argmax) over all candidates), :mod:`.window` (sliding and partition windows,
2D and 3D), :mod:`.backward` (gather/scatter through the saved indices); :mod:`.library` registers
them as the CUDA implementations of the op family ``torch.ops.salign_kernels.*``.

Importing this package never fails: without Triton, ``status()`` says why and ``match`` raises.
CPU tensors run through Triton's interpreter only when ``TRITON_INTERPRET=1`` was set before the
package was imported (slow: for tests and debugging).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..._backend import BackendStatus
from ..._matching import Matching
from .._library import call_alignment_loss, call_match, call_match_symmetric

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


def unsupported(feat_a: torch.Tensor, matching: Matching) -> Optional[str]:
    return None


def _family(feat: torch.Tensor):
    if _library is None:
        raise RuntimeError(status().reason)
    return _library.family_for(feat.device)


def match(feat_a, feat_b, matching: Matching):
    """Matching of :func:`salign_kernels.reference.match` by the Triton kernels; differentiable values."""
    return call_match(_family(feat_a), feat_a, feat_b, matching)


def fuses_symmetric(feat_a: torch.Tensor, matching: Matching) -> bool:
    """Dense matching takes both directions from one op: each map is prepared once, and the two
    scans share it (no memory beyond the outputs). Windowed matching runs two ops."""
    return matching.dense and _library is not None


def match_symmetric(feat_a, feat_b, matching: Matching):
    """Both directions, ``[(values_ab, indices_ab), (values_ba, indices_ba)]``, from one op."""
    return call_match_symmetric(_family(feat_a), feat_a, feat_b, matching)


def fused_alignment_loss(feat_a, feat_b, matching: Matching, symmetric: bool, reduction: str) -> torch.Tensor:
    """The ``"mean"`` or ``"sum"`` loss of :func:`salign_kernels.local_alignment_loss` from one fused
    op: the reduction and its gradient run in the kernels (a training step of one direction is a
    handful of launches, no host synchronisation)."""
    return call_alignment_loss(_family(feat_a), feat_a, feat_b, matching, symmetric, reduction == "mean")
