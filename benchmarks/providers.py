"""Benchmark providers: the implementations compared, as functions any benchmark file can share.

A provider turns a problem (window, mode) into ``loss(feat_a, feat_b) -> scalar``, the one-way LA /
WLA loss with ``reduction="mean"``, so that forward, backward and both together can be timed the
same way for every implementation:

- ``reference``: :func:`salign_kernels.reference.local_alignment_loss` in eager mode, in whatever
  dtype the features have (it computes in float32 for half inputs, as every backend does).
- ``reference_compiled``: the same function through ``torch.compile``.
- ``reference_chunked``: the reference's dense matching over chunks of queries, so that only a
  ``(chunk x N)`` block of similarities exists at a time: what a careful PyTorch user would write
  to fit large maps in memory. Windowed problems fall back to the plain reference.
- ``triton``: :func:`salign_kernels.local_alignment_loss` with ``backend="triton"``.
- ``triton_tf32x3``: ``triton`` with float32 features multiplied as three TF32 products
  (``salign_kernels.ops.triton._runtime.FP32_PRECISION = "tf32x3"``) instead of true float32
  products: an opt-in whose speed and accuracy the GPU check measures.
- ``triton_two_pass``: the symmetric loss from two one-way Triton passes, to compare with the fused
  symmetric pass that ``triton`` uses for dense matching (the same as ``triton`` when one-way).

``symmetric=True`` gives the loss of both directions (a -> b and b -> a, averaged).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

import salign_kernels as sk
from salign_kernels import reference

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

PROVIDERS = ("reference", "reference_compiled", "reference_chunked", "triton", "triton_tf32x3", "triton_two_pass")


def chunked_dense_match(feat_a, feat_b, chunk: int = 2048, normalize: bool = True):
    """Dense matching with the reference's formulas, ``chunk`` queries at a time.

    Peak memory O(B * chunk * N) instead of O(B * N^2); autograd saves only each chunk's indices,
    so the backward pass is as bounded. Shape: ``(B, C, H, W)`` -> ``(values, indices)`` ``(B, H, W)``.
    """
    B, _, H, W = feat_a.shape
    xa = reference.prepare_features(feat_a, normalize).flatten(2).transpose(1, 2)  # (B, N, C)
    xb = reference.prepare_features(feat_b, normalize).flatten(2)  # (B, C, N)
    values, indices = [], []
    for start in range(0, H * W, chunk):
        v, i = torch.bmm(xa[:, start:start + chunk], xb).max(dim=-1)
        values.append(v)
        indices.append(i)
    return torch.cat(values, 1).view(B, H, W), torch.cat(indices, 1).view(B, H, W)


def make_loss(provider: str, window: Optional[int] = None, mode: str = "sliding", compile_backend: str = "inductor",
              symmetric: bool = False) -> Loss:
    """The provider's loss for a problem; ``compile_backend`` only for ``reference_compiled``."""
    if provider == "reference":
        return lambda a, b: reference.local_alignment_loss(a, b, window, mode, symmetric)
    if provider == "reference_compiled":
        fn = lambda a, b: reference.local_alignment_loss(a, b, window, mode, symmetric)  # noqa: E731
        return torch.compile(fn, backend=compile_backend, dynamic=False)
    if provider == "reference_chunked":
        if window is not None:
            return make_loss("reference", window, mode, symmetric=symmetric)
        if symmetric:
            return lambda a, b: reference.alignment_loss([chunked_dense_match(a, b), chunked_dense_match(b, a)])
        return lambda a, b: reference.alignment_loss([chunked_dense_match(a, b)])
    if provider == "triton":
        return lambda a, b: sk.local_alignment_loss(
            a, b, window=window, window_mode=mode, symmetric=symmetric, backend="triton"
        )
    if provider == "triton_tf32x3":
        from salign_kernels.ops.triton import _runtime

        triton_loss = make_loss("triton", window, mode, symmetric=symmetric)

        def tf32x3(a, b):
            previous, _runtime.FP32_PRECISION = _runtime.FP32_PRECISION, "tf32x3"
            try:
                return triton_loss(a, b)
            finally:
                _runtime.FP32_PRECISION = previous

        return tf32x3
    if provider == "triton_two_pass":
        from salign_kernels.ops import triton as backend

        def two_pass(a, b):
            directions = [backend.match(a, b, window, mode, None, None, True)]
            if symmetric:
                directions.append(backend.match(b, a, window, mode, None, None, True))
            return reference.alignment_loss(directions)

        return two_pass
    raise ValueError(f"provider must be one of {PROVIDERS}; got {provider!r}")


def dense_flops(shape) -> float:
    """Multiply-adds of the dense similarities as flops: ``2 * B * N^2 * C``."""
    B, C, H, W = shape
    return 2.0 * B * (H * W) ** 2 * C


#: Dense (non-sparse) bfloat16 tensor-core peaks in TFLOP/s, from the vendors' data sheets, by a
#: substring of ``torch.cuda.get_device_name()``; the first match wins.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A10G", 70.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def bf16_peak_tflops(device_name: str) -> Optional[float]:
    for key, peak in BF16_PEAK_TFLOPS:
        if key in device_name:
            return peak
    return None
