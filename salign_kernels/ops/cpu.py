"""The C++ CPU backend: the compiled ops ``torch.ops.salign_kernels.*``, their fake
implementations (so ``torch.compile`` traces them without a graph break) and their autograd.

The op contract is in :mod:`salign_kernels.ops._common`; the kernels in ``csrc/cpu/``.
"""

from __future__ import annotations

import torch

from .._backend import BackendStatus
from . import _common

name = "cpp"

try:
    from .. import _C  # noqa: F401  (loading the library registers the ops)
except ImportError as exc:  # not built: the backend reports why instead of failing the import
    _LOAD_ERROR = exc
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


def supports(device: torch.device) -> bool:
    return device.type == "cpu"


def capability() -> str:
    """The kernel variant in use (``"AVX512"``, ``"AVX2"`` or ``"DEFAULT"``)."""
    return torch.ops.salign_kernels.cpu_capability()


def match(feat_a, feat_b, window, mode, mask_a, mask_b, normalize):
    """One direction, a -> b; see :func:`salign_kernels.dense_match` / ``window_match``."""
    return torch.ops.salign_kernels.match(*_common.op_arguments(feat_a, feat_b, window, mode, mask_a, mask_b, normalize))


def match_symmetric(feat_a, feat_b, window, mode, mask_a, mask_b, normalize):
    """Both directions; dense matching takes both from one pass over the similarities."""
    if window is not None:
        return [
            match(feat_a, feat_b, window, mode, mask_a, mask_b, normalize),
            match(feat_b, feat_a, window, mode, mask_b, mask_a, normalize),
        ]
    values_ab, indices_ab, values_ba, indices_ba = torch.ops.salign_kernels.match_symmetric(
        *_common.op_arguments(feat_a, feat_b, window, mode, mask_a, mask_b, normalize)
    )
    return [(values_ab, indices_ab), (values_ba, indices_ba)]


def _register() -> None:
    @torch.library.register_fake("salign_kernels::match")
    def _match_fake(xa, xb, scale_a, scale_b, mask_a, mask_b, window, mode):
        return _common.shape_values(xa)

    @torch.library.register_fake("salign_kernels::match_symmetric")
    def _match_symmetric_fake(xa, xb, scale_a, scale_b, mask_a, mask_b, window, mode):
        return (*_common.shape_values(xa), *_common.shape_values(xb))

    @torch.library.register_fake("salign_kernels::match_backward")
    def _match_backward_fake(grad_values, xa, xb, scale_a, scale_b, indices):
        return _common.backward_shapes(xa, xb, scale_a, scale_b)

    backward = torch.ops.salign_kernels.match_backward
    _common.register_match_autograd("salign_kernels::match", backward)
    _common.register_symmetric_autograd("salign_kernels::match_symmetric", backward)


if _LOAD_ERROR is None:
    _register()
