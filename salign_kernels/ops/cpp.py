"""The C++ CPU backend: the compiled kernels of ``salign_kernels/csrc/`` behind the op family of
:mod:`salign_kernels.ops._library`.

The kernels take the ``(B, C, *spatial)`` features as they are, in any memory layout, normalise
inside the kernels and write the gradients in the features' layout: on a CPU, where every pass over
``B x C x N`` values costs memory bandwidth, this saves layout copies, the norms and their autograd.
Loading the extension registers its kernels for CPU tensors: the prebuilt ``salign_kernels._C``, or
the same sources compiled at first use (:mod:`salign_kernels.ops._extension`), so importing this
module may take minutes once per torch version and machine; :data:`EXTENSION` says which.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._backend import BackendStatus
from .._matching import Matching
from ._extension import load
from ._library import call_match, call_match_symmetric, op_family

name = "cpp"

OPS = op_family()  # the schemas first: the extension's kernels register against them

#: Where the kernels came from (prebuilt, compiled at first use) or why there are none.
EXTENSION = load()


def status() -> BackendStatus:
    if EXTENSION.origin is None:
        return BackendStatus(False, EXTENSION.reason)
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
