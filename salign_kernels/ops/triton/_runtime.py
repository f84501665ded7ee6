"""What every Triton launcher of this package shares: interpreter detection, dtype flags, the op
contract's checks, the voxel-major view of a map, the device guard.

The kernels run compiled on CUDA tensors, or through Triton's interpreter on CPU tensors when the
environment variable ``TRITON_INTERPRET=1`` was set before this package was imported (Triton reads
it when a kernel is decorated). The interpreter exists for tests and debugging: it runs the same
kernel source with numpy, slowly.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Optional

import torch
import triton

from ..._config import get_float32_precision
from ..._matching import WINDOW_MODE_CODES
from ..._numerics import SUPPORTED_DTYPES, accumulation_dtype

#: Voxels per map must stay below this: the kernels keep voxel indices in int32 with a flag bit.
MAX_VOXELS = 2**30
#: CUDA's limit on grid dimensions y and z; the launchers put the batch (and depth) there.
MAX_GRID_YZ = 65535


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` (a ``@triton.jit`` function) runs in Triton's interpreter.

    Read from the decorated object itself, so it agrees with how the kernel was built whatever the
    environment says now.
    """
    return type(kernel).__name__ == "InterpretedFunction"


def next_power_of_2(n: int) -> int:
    return int(triton.next_power_of_2(max(int(n), 1)))


def feature_flags(dtype: torch.dtype, device: torch.device, interpreted: bool) -> dict:
    """Compile-time flags of the kernels for features of ``dtype`` on ``device``.

    - ``IS_F64``: float64 features accumulate in float64, without ``tl.dot`` (gradcheck path).
    - ``UPCAST``: cast half operands to float32 before ``tl.dot``. Only under the interpreter for
      bfloat16, whose ``tl.dot`` it computes wrongly (float16 and float32 are right there); compiled
      kernels feed bfloat16 to the tensor cores as it is.
    - ``PRECISION``: ``tl.dot``'s ``input_precision``, which matters for float32 operands only:
      :func:`salign_kernels.set_float32_precision`'s choice (``"auto"``: ``"tf32"`` when
      ``torch.backends.cuda.matmul.allow_tf32`` is set on a CUDA device, else ``"tf32x3"``). Half
      operands go to the tensor cores as they are whatever it says, so they keep Triton's default.
    """
    fp32_operands = dtype == torch.float32 or (interpreted and dtype == torch.bfloat16)
    precision = get_float32_precision()
    if precision == "auto":
        allow_tf32 = device.type == "cuda" and bool(torch.backends.cuda.matmul.allow_tf32)
        precision = "tf32" if allow_tf32 else "tf32x3"
    return dict(
        IS_F64=dtype == torch.float64,
        UPCAST=interpreted and dtype == torch.bfloat16,
        PRECISION=precision if fp32_operands else "tf32",
    )


def mask_pointer(mask: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    """A bool mask as contiguous bytes for the kernel; ``fallback`` stands in (never read) when
    there is none."""
    return fallback if mask is None else mask.contiguous().view(torch.uint8)


def device_of(t: torch.Tensor):
    """A context that makes ``t``'s CUDA device current (a launch goes to the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def unfilled_allocations():
    """A context in which new tensors are not filled, deterministic mode or not.

    Under ``torch.use_deterministic_algorithms(True)`` PyTorch fills every new tensor
    (``torch.utils.deterministic.fill_uninitialized_memory``): on a GPU one more kernel launch per
    allocation, some 16 in a training step of the fused loss. The ops' kernels write every element
    of what they allocate, so their results are the same bits either way; the setting is restored
    on leaving.
    """
    deterministic = torch.utils.deterministic
    if not (torch.are_deterministic_algorithms_enabled() and deterministic.fill_uninitialized_memory):
        yield
        return
    deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        deterministic.fill_uninitialized_memory = True


def without_fills(implementation):
    """``implementation`` run in :func:`unfilled_allocations`."""

    @functools.wraps(implementation)
    def run(*args, **kwargs):
        with unfilled_allocations():
            return implementation(*args, **kwargs)

    return run


def voxel_major(feat: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial) -> (B, N, C)``: a view when the spatial axes flatten to one (contiguous
    and channels-last maps, the usual cases), else a copy. Differentiable.

    The kernels address channel ``c`` of voxel ``p`` of sample ``b`` at ``b * s0 + p * s1 + c * s2``:
    the view of a contiguous map has ``s1 == 1``, of a channels-last one ``s2 == 1``.
    """
    B, C = feat.shape[:2]
    order = (0, *range(2, feat.dim()), 1)
    return feat.permute(order).reshape(B, -1, C)


def is_view_of(view: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether ``view`` shares ``base``'s memory (no copy was made)."""
    return view.data_ptr() == base.data_ptr() or base.numel() == 0


def _fail(kind, message: str):
    raise kind(f"salign_kernels (triton): {message}")


def _check_map(name: str, x, like: Optional[torch.Tensor] = None) -> None:
    if not isinstance(x, torch.Tensor):
        _fail(TypeError, f"{name} must be a tensor; got {type(x).__name__}")
    if x.dim() not in (4, 5):
        _fail(ValueError, f"{name} must be (B, C, H, W) or (B, C, D, H, W); got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        _fail(TypeError, f"{name} must be one of {SUPPORTED_DTYPES}; got {x.dtype}")
    if x.numel() == 0:
        _fail(ValueError, f"{name} must not be empty; got shape {tuple(x.shape)}")
    if x.shape[0] > MAX_GRID_YZ:
        _fail(ValueError, f"{name} has a batch of {x.shape[0]} maps; at most {MAX_GRID_YZ} per call (CUDA's grid "
                          "limit): split the batch")
    voxels = math.prod(x.shape[2:])
    if voxels >= MAX_VOXELS:
        _fail(ValueError, f"{name} has N = {voxels} voxels; at most {MAX_VOXELS - 1} are supported")
    if like is not None:
        if x.shape != like.shape:
            _fail(ValueError, f"{name} must have shape {tuple(like.shape)}; got {tuple(x.shape)}")
        if x.dtype != like.dtype:
            _fail(TypeError, f"{name} must have dtype {like.dtype}; got {x.dtype}")
        if x.device != like.device:
            _fail(ValueError, f"{name} must be on {like.device}; got {x.device}")


def _check_per_voxel(name: str, t, feat: torch.Tensor, dtype: Optional[torch.dtype]) -> None:
    """A ``(B, *spatial)`` tensor on ``feat``'s device, of ``dtype``."""
    if not isinstance(t, torch.Tensor):
        _fail(TypeError, f"{name} must be a tensor; got {type(t).__name__}")
    expected = (feat.shape[0], *feat.shape[2:])
    if tuple(t.shape) != expected:
        _fail(ValueError, f"{name} must have shape (B, *spatial) = {expected}; got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        _fail(TypeError, f"{name} must have dtype {dtype}; got {t.dtype}")
    if t.device != feat.device:
        _fail(ValueError, f"{name} must be on {feat.device}; got {t.device}")


def check_forward(feat_a, feat_b, mask_a, mask_b, window, mode: int) -> None:
    """The forward ops' contract (see ``salign_kernels.ops._library``); raises, never asserts."""
    _check_map("feat_a", feat_a)
    _check_map("feat_b", feat_b, like=feat_a)
    for name, mask in (("mask_a", mask_a), ("mask_b", mask_b)):
        if mask is not None:
            _check_per_voxel(name, mask, feat_a, torch.bool)
    if mode not in WINDOW_MODE_CODES.values():
        _fail(ValueError, f"mode must be one of {WINDOW_MODE_CODES}; got {mode!r}")
    spatial = tuple(feat_a.shape[2:])
    if len(window) not in (0, len(spatial)):
        _fail(ValueError, f"window must be [] (dense) or one size per spatial axis ({len(spatial)}); got {window!r}")
    for k in window:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max(spatial):
            _fail(ValueError, f"window sizes must be ints in [1, max(spatial) = {max(spatial)}]; got {window!r}")
        if mode == WINDOW_MODE_CODES["sliding"] and k % 2 == 0:
            _fail(ValueError, f"sliding window sizes must be odd; got {window!r}")


def check_backward(grad_values, feat_a, feat_b, indices) -> None:
    """The backward op's contract; raises, never asserts."""
    _check_map("feat_a", feat_a)
    _check_map("feat_b", feat_b, like=feat_a)
    _check_per_voxel("grad_values", grad_values, feat_a, accumulation_dtype(feat_a.dtype))
    _check_per_voxel("indices", indices, feat_a, torch.int64)


def check_loss_backward(grad_loss, feat_a, feat_b, values, indices, counts, rows_a, factors_a, rows_b,
                        factors_b) -> None:
    """The fused loss backward's contract: what its forward returned, for these maps."""
    _check_map("feat_a", feat_a)
    _check_map("feat_b", feat_b, like=feat_a)
    acc = accumulation_dtype(feat_a.dtype)
    B, C, N = feat_a.shape[0], feat_a.shape[1], math.prod(feat_a.shape[2:])
    if not isinstance(grad_loss, torch.Tensor) or grad_loss.numel() != 1 or grad_loss.dtype != acc:
        _fail(ValueError, f"grad_loss must be a one-element {acc} tensor; got {grad_loss!r}")
    expected = {
        "values": ((None, B, N), acc), "indices": ((None, B, N), torch.int64), "counts": ((None,), torch.int64),
        "factors_a": ((3, B, N), acc), "factors_b": ((3, B, N), acc),
    }
    directions = values.shape[0] if isinstance(values, torch.Tensor) and values.dim() == 3 else None
    if directions not in (1, 2):
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        _fail(ValueError, f"values must be (directions, B, N) with 1 or 2 directions; got {got}")
    for name, t in (("values", values), ("indices", indices), ("counts", counts), ("factors_a", factors_a),
                    ("factors_b", factors_b)):
        shape, dtype = expected[name]
        shape = tuple(directions if s is None else s for s in shape)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype or t.device != feat_a.device:
            _fail(ValueError, f"{name} must be a {dtype} tensor of shape {shape} on {feat_a.device}; got "
                              f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if not t.is_contiguous():
            _fail(ValueError, f"{name} must be contiguous")
    for name, rows, feat in (("rows_a", rows_a, feat_a), ("rows_b", rows_b, feat_b)):
        ok = isinstance(rows, torch.Tensor) and rows.dtype == feat.dtype and rows.device == feat.device and (
            rows.numel() == 0 or (tuple(rows.shape) == (B, N, C) and rows.is_contiguous()))
        if not ok:
            _fail(ValueError, f"{name} must be empty or contiguous (B, N, C) = {(B, N, C)} of {feat.dtype}; got "
                              f"{getattr(rows, 'dtype', type(rows).__name__)} {tuple(getattr(rows, 'shape', ()))}")
