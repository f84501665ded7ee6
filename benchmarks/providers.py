"""What the benchmarks compare: providers of the LA loss, canonical shapes, and their flop counts.

A provider turns ``(feat_a, feat_b)`` into the LA loss with one implementation:

- ``reference``: :mod:`salign_kernels.reference`, the plain PyTorch a user would write
  (``bmm`` + ``max`` for dense matching, ``unfold`` for sliding windows);
- ``reference_chunked``: the strongest pure-PyTorch alternative for dense matching, a loop over
  query chunks whose similarity block is ``(B, chunk, N)``: memory-bounded, same flops;
- ``reference_compiled``: ``torch.compile`` of the reference (GPU benchmarks);
- ``cpp``, ``triton``: the compiled backends through the public API;
- ``cpp_two_pass``, ``triton_two_pass``: a symmetric loss as two one-way passes, the alternative
  to the backend's fused symmetric pass;
- ``triton_ieee``: ``triton`` with float32 features multiplied as true float32 products on the
  CUDA cores (``salign_kernels.set_float32_precision("ieee")``) instead of the default three TF32
  tensor-core products: the opt-in whose speed the GPU check measures;
- ``triton_deterministic``: ``triton`` under ``torch.use_deterministic_algorithms(True)`` (the
  sorted, fixed-order scatter of the backward); the caller enters :func:`provider_context` around
  the forward and the backward;
- ``triton_graphs``: ``torch.compile(..., mode="reduce-overhead")`` of the ``triton`` loss: the
  step replayed as CUDA graphs, without the host's launch overhead;
- ``triton_composed``: the Triton matches reduced in PyTorch (the reduction and its autograd as
  PyTorch's small kernels), what the ``triton`` loss's fused op replaced.
"""

from __future__ import annotations

import math
import os
import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

import salign_kernels as sk
from salign_kernels import reference

# Canonical shapes (B, C, H, W) and (B, C, D, H, W).
CPU_DENSE_SHAPES = {"S": (16, 128, 32, 32), "M": (8, 64, 64, 64), "L": (2, 64, 128, 128)}
CPU_WINDOW_SHAPE = (8, 64, 128, 128)
CPU_WINDOWS = [(7, "sliding"), (15, "sliding"), (7, "partition"), (15, "partition")]
CPU_DENSE_3D_SHAPE = (2, 64, 16, 32, 32)  # N = 16,384 voxels: the reference's matrix is 2 GiB
CPU_WINDOW_3D_SHAPE = (2, 32, 32, 32, 32)
CPU_WINDOWS_3D = [(5, "sliding"), ((1, 7, 7), "sliding"), (4, "partition")]
MM_SHAPE = (4096, 512, 4096)  # the torch.mm throughput that matching is compared with

# GPU cases (B, C, H, W) of the Triton backend's goals.
GPU_DENSE_SHAPE = (8, 128, 128, 128)
GPU_LARGE_SHAPE = (4, 128, 256, 256)  # the reference would need ~69 GB for its similarities alone
GPU_VOLUME_SHAPE = (2, 128, 32, 32, 32)  # N = 32,768 voxels per sub-volume

if os.environ.get("SALIGN_BENCH_QUICK") == "1":  # tiny stand-ins that exercise the machinery only
    CPU_DENSE_SHAPES = {"S": (2, 16, 8, 8), "M": (2, 8, 12, 12), "L": (1, 8, 16, 16)}
    CPU_WINDOW_SHAPE = (2, 8, 16, 16)
    CPU_DENSE_3D_SHAPE = (1, 8, 4, 6, 6)
    CPU_WINDOW_3D_SHAPE = (1, 8, 4, 8, 8)
    MM_SHAPE = (64, 32, 64)


def _axis_pairs(size: int, k: int, mode: str) -> int:
    """Query-candidate pairs along one axis of ``size``: borders clipped (sliding), ragged tiles
    (partition). Candidate sets factor over the axes, so a map's pairs are the product."""
    if mode == "sliding":
        r = k // 2
        return sum(min(size, x + r + 1) - max(0, x - r) for x in range(size))
    full, rest = divmod(size, k)
    return full * k * k + rest * rest


@dataclass(frozen=True)
class Case:
    """One benchmarked problem: ``shape`` is (B, C, H, W) or (B, C, D, H, W); ``window`` an int or
    one size per spatial axis."""

    shape: tuple
    window: Optional[Union[int, tuple]] = None
    mode: str = "sliding"
    symmetric: bool = False
    dtype: torch.dtype = torch.float32

    @property
    def spatial(self) -> tuple:
        return tuple(self.shape[2:])

    @property
    def windows(self) -> Optional[tuple]:
        """The window, one size per spatial axis."""
        if self.window is None:
            return None
        return (self.window,) * len(self.spatial) if isinstance(self.window, int) else tuple(self.window)

    @property
    def label(self) -> str:
        if self.window is None:
            kind = "dense"
        else:
            size = self.window if isinstance(self.window, int) else "x".join(map(str, self.window))
            kind = f"{self.mode} k={size}"
        return kind + (" 3D" if len(self.spatial) == 3 else "") + (" symmetric" if self.symmetric else "")

    def pairs(self) -> int:
        """(query, candidate) pairs of one direction over the batch: the real candidates only."""
        B = self.shape[0]
        N = math.prod(self.spatial)
        if self.window is None:
            return B * N * N
        return B * math.prod(_axis_pairs(size, k, self.mode) for size, k in zip(self.spatial, self.windows))

    def flops(self) -> float:
        """Multiply-adds x 2 of the similarities one forward pass needs (all directions)."""
        return 2.0 * self.shape[1] * self.pairs() * (2 if self.symmetric else 1)

    def reference_bytes(self) -> float:
        """The largest tensor the reference materialises: the similarities or the unfolded windows."""
        B, C = self.shape[:2]
        N = math.prod(self.spatial)
        size = torch.finfo(torch.float32).bits // 8
        if self.window is None:
            return B * N * N * size
        K = math.prod(self.windows)
        if self.mode == "sliding":
            return B * C * K * N * size
        tiles = math.prod(math.ceil(s / k) for s, k in zip(self.spatial, self.windows))
        return B * tiles * K * K * size


def chunked_dense_match(feat_a, feat_b, mask_a=None, mask_b=None, normalize=True, chunk=1024):
    """Dense matching in query chunks: the same result as the reference, O(B chunk N) memory.

    Autograd keeps only each chunk's inputs (views) and argmax, so the backward is chunked too.
    """
    B, N = feat_a.shape[0], math.prod(feat_a.shape[2:])
    with torch.autocast(feat_a.device.type, enabled=False):
        xa = reference.prepare_features(feat_a, normalize, mask_a).flatten(2).transpose(1, 2)  # (B, N, C)
        xb = reference.prepare_features(feat_b, normalize, mask_b).flatten(2)  # (B, C, N)
        candidates = None if mask_b is None else mask_b.reshape(B, 1, N)
        values, indices = [], []
        for start in range(0, N, chunk):
            sim = torch.bmm(xa[:, start : start + chunk], xb)  # (B, chunk, N)
            if candidates is not None:
                sim = sim.masked_fill(~candidates, float("-inf"))
            v, i = sim.max(dim=-1)
            values.append(v)
            indices.append(i)
        values, indices = torch.cat(values, dim=1), torch.cat(indices, dim=1)
    valid = torch.ones(B, N, dtype=torch.bool, device=feat_a.device)
    if candidates is not None:
        valid = valid & candidates.any(dim=-1)
    if mask_a is not None:
        valid = valid & mask_a.reshape(B, N)
    shape = (B, *feat_a.shape[2:])
    return values.masked_fill(~valid, 0.0).view(shape), indices.masked_fill(~valid, -1).view(shape)


def loss_function(provider: str, case: Case, compile_backend: str = "inductor") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``fn(feat_a, feat_b) -> loss`` of ``provider`` for ``case`` (mean reduction, no masks).

    ``compile_backend`` is the ``torch.compile`` backend of ``reference_compiled``.
    """
    options = dict(window=case.window, window_mode=case.mode, symmetric=case.symmetric)
    if provider == "reference":
        return lambda a, b: reference.local_alignment_loss(a, b, case.window, case.mode, case.symmetric)
    if provider == "reference_chunked":
        if case.window is not None:
            raise ValueError("reference_chunked implements dense matching only")

        def chunked(a, b):
            directions = [chunked_dense_match(a, b)]
            if case.symmetric:
                directions.append(chunked_dense_match(b, a))
            return reference.alignment_loss(directions)

        return chunked
    if provider == "reference_compiled":
        return torch.compile(
            lambda a, b: reference.local_alignment_loss(a, b, case.window, case.mode, case.symmetric),
            backend=compile_backend,
        )
    if provider in ("cpp_two_pass", "triton_two_pass"):  # symmetric as two one-way passes
        backend = provider[: -len("_two_pass")]
        return lambda a, b: (sk.local_alignment_loss(a, b, window=case.window, window_mode=case.mode, backend=backend)
                             + sk.local_alignment_loss(b, a, window=case.window, window_mode=case.mode, backend=backend)) / 2
    if provider == "triton_deterministic":
        return lambda a, b: sk.local_alignment_loss(a, b, backend="triton", **options)
    if provider == "triton_graphs":
        graphs = dict(mode="reduce-overhead") if compile_backend == "inductor" else {}
        return torch.compile(lambda a, b: sk.local_alignment_loss(a, b, backend="triton", **options),
                             backend=compile_backend, **graphs)
    if provider == "triton_composed":
        from salign_kernels import _backend
        from salign_kernels._validation import check_match_inputs
        from salign_kernels.ops import triton as triton_backend

        def composed(a, b):
            matching = check_match_inputs(a, b, None, None, True, case.window, case.mode)
            return _backend.composed_alignment_loss(triton_backend, a, b, matching, case.symmetric, "mean")

        return composed
    if provider == "triton_ieee":
        def ieee(a, b):
            previous = sk.set_float32_precision("ieee")
            try:
                return sk.local_alignment_loss(a, b, backend="triton", **options)
            finally:
                sk.set_float32_precision(previous)

        return ieee
    return lambda a, b: sk.local_alignment_loss(a, b, backend=provider, **options)


@contextlib.contextmanager
def provider_context(provider: str):
    """The global state a provider runs under, forward and backward: deterministic algorithms for
    ``triton_deterministic``, nothing for the others."""
    if provider != "triton_deterministic":
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def make_inputs(case: Case, device="cpu", seed=0, requires_grad=True):
    """Two random feature maps of ``case`` (standard normal, from a fixed seed)."""
    generator = torch.Generator().manual_seed(seed)
    feats = []
    for _ in range(2):
        x = torch.randn(case.shape, generator=generator)
        feats.append(x.to(device=device, dtype=case.dtype).requires_grad_(requires_grad))
    return feats


def run_mode(fn, feat_a, feat_b, mode: str):
    """One step of ``mode``: ``"forward"`` (with autograd, as in training), ``"full"`` (forward and
    backward). ``"backward"`` is timed by the caller around ``loss.backward()``."""
    feat_a.grad = feat_b.grad = None
    loss = fn(feat_a, feat_b)
    if mode == "full":
        loss.backward()
    return loss


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
    """The dense bf16 tensor-core peak of a GPU named ``device_name``, or None when unknown."""
    for key, peak in BF16_PEAK_TFLOPS:
        if key in device_name:
            return peak
    return None
