"""The C++ CPU backend: the compiled ops ``torch.ops.salign_kernels.*``, their fake
implementations (so ``torch.compile`` traces them without a graph break) and their autograd.

Unlike the pixel-major contract of :mod:`salign_kernels.ops._common` (which the Triton backend
uses), the C++ ops take the ``(B, C, H, W)`` features as they are, in any memory layout, and
normalise inside the kernels; their backward writes the gradients of the features themselves, in
the features' layout, the normalisation included. On a CPU, where every pass over ``B x C x H x W``
values costs memory bandwidth, this saves the layout copies, the norms and their autograd.
The kernels are in ``csrc/cpu/``; the op schemas in ``csrc/ops.cpp``.
"""

from __future__ import annotations

import torch

from .._backend import BackendStatus
from .._dtypes import accumulation_dtype
from ._common import encode_window, register_match_autograd, register_symmetric_autograd

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
    window_code, mode_code = encode_window(window, mode)
    return torch.ops.salign_kernels.match(feat_a, feat_b, mask_a, mask_b, window_code, mode_code, normalize)


def match_symmetric(feat_a, feat_b, window, mode, mask_a, mask_b, normalize):
    """Both directions; dense matching takes both from one pass over the similarities."""
    if window is not None:
        return [
            match(feat_a, feat_b, window, mode, mask_a, mask_b, normalize),
            match(feat_b, feat_a, window, mode, mask_b, mask_a, normalize),
        ]
    window_code, mode_code = encode_window(window, mode)
    values_ab, indices_ab, values_ba, indices_ba = torch.ops.salign_kernels.match_symmetric(
        feat_a, feat_b, mask_a, mask_b, window_code, mode_code, normalize
    )
    return [(values_ab, indices_ab), (values_ba, indices_ba)]


def _values_like(feat):
    B, _, H, W = feat.shape
    return feat.new_empty((B, H, W), dtype=accumulation_dtype(feat.dtype))


def _indices_like(feat):
    B, _, H, W = feat.shape
    return feat.new_empty((B, H, W), dtype=torch.int64)


def _register() -> None:
    backward = torch.ops.salign_kernels.match_backward

    @torch.library.register_fake("salign_kernels::match")
    def _match_fake(feat_a, feat_b, mask_a, mask_b, window, mode, normalize):
        return _values_like(feat_a), _indices_like(feat_a)

    @torch.library.register_fake("salign_kernels::match_symmetric")
    def _match_symmetric_fake(feat_a, feat_b, mask_a, mask_b, window, mode, normalize):
        return _values_like(feat_a), _indices_like(feat_a), _values_like(feat_b), _indices_like(feat_b)

    @torch.library.register_fake("salign_kernels::match_backward")
    def _match_backward_fake(grad_values, feat_a, feat_b, indices, normalize):
        return torch.empty_like(feat_a), torch.empty_like(feat_b)

    # Autograd: the values are differentiable in both feature maps, the indices are not.
    register_match_autograd("salign_kernels::match", backward)
    register_symmetric_autograd("salign_kernels::match_symmetric", backward)


if _LOAD_ERROR is None:
    _register()
