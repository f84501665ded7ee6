"""The C++ CPU backend: the compiled kernels of ``csrc/`` behind the op family of
:mod:`salign_kernels.ops._library`.

The kernels take the ``(B, C, *spatial)`` features as they are, in any memory layout, normalise
inside the kernels and write the gradients in the features' layout: on a CPU, where every pass over
``B x C x N`` values costs memory bandwidth, this saves layout copies, the norms and their autograd.
Loading the extension ``salign_kernels._C`` registers its kernels for CPU tensors.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._backend import BackendStatus
from .._matching import Matching
from ._library import call_match, call_match_symmetric, op_family

name = "cpp"

OPS = op_family()  # the schemas first: the extension's kernels register against them

try:
    from .. import _C  # noqa: F401  (loading the library registers the kernels)
except ImportError as exc:  # not built: the backend reports why instead of failing the import
    _LOAD_ERROR: Optional[BaseException] = exc
else:
    _LOAD_ERROR = None


def status() -> BackendStatus:
    if _LOAD_ERROR is not None:
        return BackendStatus(
            False,
            f"the C++ extension salign_kernels._C is not built ({_LOAD_ERROR}); "
            "install the package with `pip install --no-build-isolation .` after torch",
        )
    return BackendStatus(True)


def supports(device) -> bool:
    return torch.device(device).type == "cpu"


def unsupported(feat_a: torch.Tensor, matching: Matching) -> Optional[str]:
    return None


def capability() -> str:
    """The kernel variant in use (``"AVX512"``, ``"AVX2"`` or ``"DEFAULT"``)."""
    return torch.ops.salign_kernels.cpu_capability()


def match(feat_a, feat_b, matching: Matching):
    """One direction, a -> b; see :func:`salign_kernels.dense_match` / ``window_match``."""
    return call_match(OPS, feat_a, feat_b, matching)


def fuses_symmetric(feat_a, matching: Matching) -> bool:
    """Dense matching takes both directions from one pass over the similarities."""
    return matching.dense


def match_symmetric(feat_a, feat_b, matching: Matching):
    return call_match_symmetric(OPS, feat_a, feat_b, matching)
