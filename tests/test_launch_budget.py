"""Kernel launches of one training step on the Triton backend: forward, loss and backward.

A step at the canonical GPU shapes is host-bound, so its launch count is part of its speed. The
count is taken under Triton's interpreter (or on a GPU) on a tiny problem: every Triton launch of
the launchers, and every PyTorch kernel of the step around the ops (the loss's reduction and its
autograd), leaving out what launches nothing (views, allocations).

The Triton counts are exact: a change that adds a launch fails here first. The step's budget (at
most 8 launches for one direction, 12 for a symmetric loss, twice that with the deterministic
backward) is not met yet: the loss's reduction and its gradient are PyTorch's, about 20 small
kernels; a fused loss op is the way there. That gap is a strict xfail, so closing it fails the suite
until the mark goes.
"""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import salign_kernels as sk

pytest.importorskip("triton")
if not sk.backends()["triton"]:
    pytest.skip(f"triton unavailable: {sk.backends()['triton'].reason}", allow_module_level=True)

from salign_kernels.ops.triton import backward, dense, prepare, window  # noqa: E402

#: Ops that launch no kernel: views, metadata, allocations.
NO_KERNEL = {
    "view", "_unsafe_view", "permute", "expand", "t", "transpose", "as_strided", "slice", "select", "unsqueeze",
    "squeeze", "alias", "detach", "reshape", "flatten", "_reshape_alias", "lift_fresh", "empty", "empty_like",
    "empty_strided", "new_empty", "new_empty_strided", "is_same_size", "size", "stride", "sym_size", "sym_stride",
    "sym_numel", "dim", "is_contiguous", "_local_scalar_dense",
}
OUR_NAMESPACES = ("salign_kernels", "salign_kernels_interpreter")


class _CountKernels(TorchDispatchMode):
    """The step's PyTorch kernels around our ops, by op name. What runs inside an op (its
    implementation runs with the mode off) is not seen: one fill of the backward's accumulators on
    the atomic path, the inverse index's sort and search on the deterministic one."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace not in OUR_NAMESPACES and name not in NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


class _CountingKernel:
    """Stands in for a kernel: counts each ``kernel[grid](...)`` launch, then launches it."""

    def __init__(self, kernel, counts, name):
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counts[self.name] += 1
            return self.kernel[grid](*args, **kwargs)

        return launch

    def __getattr__(self, attr):  # what the launchers read off a kernel
        return getattr(self.kernel, attr)


@contextlib.contextmanager
def _count_triton(monkeypatch, counts):
    for module in (dense, window, backward, prepare):
        for name, value in list(vars(module).items()):
            if name.endswith("_kernel") and hasattr(value, "__getitem__") and not isinstance(value, dict):
                monkeypatch.setattr(module, name, _CountingKernel(value, counts, name))
            elif name.startswith("_TUNED_KERNEL") and value is not None:
                monkeypatch.setattr(module, name, _CountingKernel(value, counts, "_dense_match_fwd_kernel"))
    yield


CASES = {
    "dense": dict(window=None),
    "dense symmetric": dict(window=None, symmetric=True),
    "sliding 3": dict(window=3),
    "partition 2": dict(window=2, window_mode="partition"),
}
#: Triton launches of one step (forward, backward) as the kernels stand: two prepare passes per
#: direction's maps in the forward and two in the backward; the scan (and the dense settle pass);
#: the gather and the finish (and the sorted scatter when deterministic).
TRITON_LAUNCHES = {
    ("dense", False): 8, ("dense", True): 9,
    ("dense symmetric", False): 14, ("dense symmetric", True): 16,
    ("sliding 3", False): 7, ("sliding 3", True): 8,
    ("partition 2", False): 7, ("partition 2", True): 8,
}
BUDGET = {"dense": 8, "dense symmetric": 12, "sliding 3": 8, "partition 2": 8}


def _step_launches(monkeypatch, case, deterministic):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(2, 8, 6, 5, generator=generator).to(device).requires_grad_() for _ in range(2))
    triton_counts = collections.Counter()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        with _count_triton(monkeypatch, triton_counts), _CountKernels() as torch_counts:
            loss = sk.local_alignment_loss(a, b, backend="triton", **CASES[case])
            loss.backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert a.grad is not None and b.grad is not None
    return triton_counts, torch_counts.ops


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_launches_per_step(monkeypatch, case, deterministic):
    triton_counts, _ = _step_launches(monkeypatch, case, deterministic)
    assert sum(triton_counts.values()) == TRITON_LAUNCHES[case, deterministic], dict(triton_counts)


@pytest.mark.xfail(strict=True, reason="known gap: the loss's reduction and its gradient run as ~20 PyTorch "
                                       "kernels; a fused loss op (sums and grad_values in the kernels) is needed")
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_step_within_launch_budget(monkeypatch, case, deterministic):
    triton_counts, torch_counts = _step_launches(monkeypatch, case, deterministic)
    total = sum(triton_counts.values()) + sum(torch_counts.values())
    budget = BUDGET[case] * (2 if deterministic else 1)
    assert total <= budget, f"{total} launches: Triton {dict(triton_counts)}, PyTorch {dict(torch_counts)}"
