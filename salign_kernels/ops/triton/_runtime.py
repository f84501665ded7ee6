"""What every Triton launcher of this package shares: interpreter detection, dtype flags, checks.

The kernels run compiled on CUDA tensors, or through Triton's interpreter on CPU tensors when the
environment variable ``TRITON_INTERPRET=1`` was set before this package was imported (Triton reads
it when a kernel is decorated). The interpreter exists for tests and debugging: it runs the same
kernel source with numpy, slowly.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton

from ..._dtypes import SUPPORTED_DTYPES, accumulation_dtype
from .._common import WINDOW_MODES, pixel_strides

#: Pixels per map must stay below this: the kernels keep pixel indices in int32 with a flag bit.
MAX_PIXELS = 2**30


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` (a ``@triton.jit`` function) runs in Triton's interpreter.

    Read from the decorated object itself, so it agrees with how the kernel was built whatever the
    environment says now.
    """
    return type(kernel).__name__ == "InterpretedFunction"


def next_power_of_2(n: int) -> int:
    return int(triton.next_power_of_2(max(int(n), 1)))


#: ``tl.dot``'s input precision for float32 features when TF32 is not allowed: ``"tf32x3"`` (each
#: operand split into a TF32 head and tail, three tensor-core products per tile: the error of
#: float32 arithmetic, measured on an H200 3x faster than ``"ieee"``) or ``"ieee"`` (true float32
#: products on the CUDA cores, slower than cuBLAS's float32 matrix product).
FP32_PRECISION = "tf32x3"
FP32_PRECISIONS = ("ieee", "tf32x3")


def feature_flags(dtype: torch.dtype, device: torch.device, interpreted: bool) -> dict:
    """Compile-time flags of the kernels for features of ``dtype`` on ``device``.

    - ``IS_F64``: float64 features accumulate in float64, without ``tl.dot`` (gradcheck path).
    - ``UPCAST``: cast half operands to float32 before ``tl.dot``. Only under the interpreter for
      bfloat16, whose ``tl.dot`` it computes wrongly (float16 and float32 are right there); compiled
      kernels feed bfloat16 to the tensor cores as it is.
    - ``PRECISION``: ``tl.dot``'s ``input_precision``. It matters for float32 operands only:
      :data:`FP32_PRECISION` (``"ieee"``: true float32 products) unless
      ``torch.backends.cuda.matmul.allow_tf32`` allows TF32 on a CUDA device. Half operands go to
      the tensor cores as they are whatever it says, so they keep Triton's default.
    """
    if FP32_PRECISION not in FP32_PRECISIONS:
        raise ValueError(f"FP32_PRECISION must be one of {FP32_PRECISIONS}; got {FP32_PRECISION!r}")
    fp32_operands = dtype == torch.float32 or (interpreted and dtype == torch.bfloat16)
    allow_tf32 = device.type == "cuda" and bool(torch.backends.cuda.matmul.allow_tf32)
    return dict(
        IS_F64=dtype == torch.float64,
        UPCAST=interpreted and dtype == torch.bfloat16,
        PRECISION=FP32_PRECISION if fp32_operands and not allow_tf32 else "tf32",
    )


def mask_pointer(mask: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    """A bool mask as bytes for the kernel; ``fallback`` stands in (never read) when there is none."""
    return fallback if mask is None else mask.view(torch.uint8)


def _fail(kind, message: str):
    raise kind(f"salign_triton: {message}")


def check_features(name: str, x, like: Optional[torch.Tensor] = None) -> None:
    """A pixel-major ``(B, H, W, C)`` tensor of a supported dtype (same as ``like``) whose H and W
    axes flatten (:func:`pixel_strides`)."""
    if not isinstance(x, torch.Tensor):
        _fail(TypeError, f"{name} must be a tensor; got {type(x).__name__}")
    if x.dim() != 4:
        _fail(ValueError, f"{name} must be pixel-major (B, H, W, C); got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        _fail(TypeError, f"{name} must be one of {SUPPORTED_DTYPES}; got {x.dtype}")
    if x.numel() == 0:
        _fail(ValueError, f"{name} must not be empty; got shape {tuple(x.shape)}")
    if pixel_strides(x) is None:
        _fail(ValueError, f"{name} must have H and W axes that flatten to one (stride(1) == W * stride(2)); "
                          f"got strides {x.stride()}")
    if x.shape[1] * x.shape[2] >= MAX_PIXELS:
        pixels = x.shape[1] * x.shape[2]
        _fail(ValueError, f"{name} has H * W = {pixels} pixels; at most {MAX_PIXELS - 1} are supported")
    if like is not None:
        if x.shape != like.shape:
            _fail(ValueError, f"{name} must have shape {tuple(like.shape)}; got {tuple(x.shape)}")
        if x.dtype != like.dtype:
            _fail(TypeError, f"{name} must have dtype {like.dtype}; got {x.dtype}")
        if x.device != like.device:
            _fail(ValueError, f"{name} must be on {like.device}; got {x.device}")


def check_pixel_tensor(name: str, t, xa: torch.Tensor, dtype: Optional[torch.dtype]) -> None:
    """A contiguous ``(B, H, W)`` tensor on ``xa``'s device, of ``dtype`` (any dtype when None)."""
    if not isinstance(t, torch.Tensor):
        _fail(TypeError, f"{name} must be a tensor; got {type(t).__name__}")
    if tuple(t.shape) != tuple(xa.shape[:3]):
        _fail(ValueError, f"{name} must have shape (B, H, W) = {tuple(xa.shape[:3])}; got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        _fail(TypeError, f"{name} must have dtype {dtype}; got {t.dtype}")
    if t.device != xa.device:
        _fail(ValueError, f"{name} must be on {xa.device}; got {t.device}")
    if not t.is_contiguous():
        _fail(ValueError, f"{name} must be contiguous; got strides {t.stride()}")


def check_forward(xa, xb, mask_a, mask_b, window: int, mode: int) -> None:
    """The forward op's contract (see ``salign_kernels.ops._common``); raises, never asserts."""
    check_features("xa", xa)
    check_features("xb", xb, like=xa)
    for name, mask in (("mask_a", mask_a), ("mask_b", mask_b)):
        if mask is not None:
            check_pixel_tensor(name, mask, xa, torch.bool)
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        _fail(ValueError, f"window must be an int >= 0 (0 for dense matching); got {window!r}")
    if mode not in WINDOW_MODES.values():
        allowed = sorted(WINDOW_MODES.values())
        _fail(ValueError, f"mode must be one of {allowed} ({WINDOW_MODES}); got {mode!r}")
    _, H, W, _ = xa.shape
    if window > max(H, W):
        _fail(ValueError, f"window must be at most max(H, W) = {max(H, W)}; got {window}")
    if window and mode == WINDOW_MODES["sliding"] and window % 2 == 0:
        _fail(ValueError, f"a sliding window must be odd; got {window}")


def check_backward(grad_values, xa, xb, indices) -> None:
    """The backward op's contract; raises, never asserts."""
    check_features("xa", xa)
    check_features("xb", xb, like=xa)
    check_pixel_tensor("grad_values", grad_values, xa, accumulation_dtype(xa.dtype))
    check_pixel_tensor("indices", indices, xa, torch.int64)
