"""Kernel launches of one training step on the Triton backend: forward, loss and backward.

A step at the canonical GPU shapes is host-bound, so its launch count is part of its speed. The
count is taken under Triton's interpreter (or on a GPU) on a tiny problem: every Triton launch of
the launchers, and every PyTorch kernel of the step, inside the ops (the backward's fill, the
deterministic sort) and around them (autograd's seed), leaving out what launches nothing (views,
allocations) and what the interpreter itself runs to launch a kernel. Under
``torch.use_deterministic_algorithms(True)`` PyTorch fills each new tensor
(``torch.utils.deterministic.fill_uninitialized_memory``), on a GPU one kernel per allocation,
inside the allocation where no dispatch mode sees it: such an allocation is counted as a launch.

The counts are exact: a change that adds a launch fails here first. The step's budget: at most 8
launches for one direction, 12 for a symmetric loss, twice that with the deterministic backward.
On a GPU the deterministic backward's ``torch.sort`` is itself a few kernels (a radix sort of
32-bit keys), counted here as one op.
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

from salign_kernels.ops.triton import _loss, backward, dense, library, prepare, window  # noqa: E402

#: Ops that launch no kernel: views, metadata, allocations.
NO_KERNEL = {
    "view", "_unsafe_view", "permute", "expand", "t", "transpose", "as_strided", "slice", "select", "unsqueeze",
    "squeeze", "alias", "detach", "reshape", "flatten", "_reshape_alias", "lift_fresh", "empty", "empty_like",
    "empty_strided", "new_empty", "new_empty_strided", "is_same_size", "size", "stride", "sym_size", "sym_stride",
    "sym_numel", "dim", "is_contiguous", "unbind",
}
OUR_NAMESPACES = ("salign_kernels", "salign_kernels_interpreter")
#: Allocations: each fills its tensor in deterministic mode while the fill setting is on.
ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


def _fills(name: str, out) -> bool:
    """Whether the op ``name`` that returned ``out`` launched a deterministic-mode fill."""
    return (name in ALLOCATIONS and torch.are_deterministic_algorithms_enabled()
            and torch.utils.deterministic.fill_uninitialized_memory
            and isinstance(out, torch.Tensor) and out.numel() > 0)


#: Whether a Triton launch is under way: what the interpreter runs then (copies of the arguments)
#: is its own machinery, not the step's.
_IN_LAUNCH = [False]


class _CountKernels(TorchDispatchMode):
    """The step's PyTorch kernels by op name, those our ops run inside included (their
    implementations run under the mode again)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace in OUR_NAMESPACES:  # the Triton implementation itself, under the mode
            with self:
                return library.IMPLEMENTATIONS[name](*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        if not _IN_LAUNCH[0]:
            if name not in NO_KERNEL:
                self.ops[name] += 1
            elif _fills(name, out):
                self.ops[f"{name} (deterministic fill)"] += 1
        return out


class _CountingKernel:
    """Stands in for a kernel: counts each ``kernel[grid](...)`` launch, then launches it."""

    def __init__(self, kernel, counts, name):
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counts[self.name] += 1
            _IN_LAUNCH[0] = True
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                _IN_LAUNCH[0] = False

        return launch

    def __getattr__(self, attr):  # what the launchers read off a kernel
        return getattr(self.kernel, attr)


@contextlib.contextmanager
def _count_triton(monkeypatch, counts):
    for module in (dense, window, backward, prepare, _loss):
        for name, value in list(vars(module).items()):
            if name.endswith("_kernel") and hasattr(value, "__getitem__") and not isinstance(value, dict):
                monkeypatch.setattr(module, name, _CountingKernel(value, counts, name))
            elif name.startswith("_TUNED_KERNEL") and value is not None:
                monkeypatch.setattr(module, name, _CountingKernel(value, counts, "_dense_match_fwd_kernel"))
    yield


CASES = {
    "dense": dict(window=None),
    "dense masked": dict(window=None, masked=True),
    "dense symmetric": dict(window=None, symmetric=True),
    "sliding 3": dict(window=3),
    "sliding 3 symmetric masked": dict(window=3, symmetric=True, masked=True),
    "partition 2": dict(window=2, window_mode="partition"),
    "3D sliding 3": dict(window=3, volume=True),
    "dense sum": dict(window=None, reduction="sum"),
}
#: Triton launches of one step as the kernels stand. Forward: one preparation of both maps, per
#: direction the scan and its settle pass (dense: which writes the loss's partial sums; windows:
#: the same kernel again, which walks only the tiles the scan left queries to), one program
#: finishing the loss. Backward: per direction the gather (and the sorted scatter when
#: deterministic) and the finish.
SCAN = {"dense": 2, "window": 2}
DIRECTIONS = {"dense symmetric": 2, "sliding 3 symmetric masked": 2}


def triton_launches(case: str, deterministic: bool) -> int:
    directions = DIRECTIONS.get(case, 1)
    scan = SCAN["dense" if CASES[case]["window"] is None else "window"]
    return 1 + directions * scan + 1 + directions * (3 if deterministic else 2)


#: Launches a step may take: one direction, two; doubled with the deterministic backward.
BUDGET = {1: 8, 2: 12}


def _step_launches(monkeypatch, case, deterministic):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    options = dict(CASES[case])
    shape = (2, 8, 3, 6, 5) if options.pop("volume", False) else (2, 8, 6, 5)
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(shape, generator=generator).to(device).requires_grad_() for _ in range(2))
    if options.pop("masked", False):
        spatial = (shape[0], *shape[2:])
        options.update(mask_a=(torch.rand(spatial, generator=generator) > 0.3).to(device),
                       mask_b=(torch.rand(spatial, generator=generator) > 0.3).to(device))
    triton_counts = collections.Counter()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        with _count_triton(monkeypatch, triton_counts), _CountKernels() as torch_counts:
            loss = sk.local_alignment_loss(a, b, backend="triton", **options)
            loss.backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert a.grad is not None and b.grad is not None
    return triton_counts, torch_counts.ops


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_launches_per_step(monkeypatch, case, deterministic):
    triton_counts, _ = _step_launches(monkeypatch, case, deterministic)
    assert sum(triton_counts.values()) == triton_launches(case, deterministic), dict(triton_counts)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_step_within_launch_budget(monkeypatch, case, deterministic):
    triton_counts, torch_counts = _step_launches(monkeypatch, case, deterministic)
    total = sum(triton_counts.values()) + sum(torch_counts.values())
    budget = BUDGET[DIRECTIONS.get(case, 1)] * (2 if deterministic else 1)
    assert total <= budget, f"{total} launches: Triton {dict(triton_counts)}, PyTorch {dict(torch_counts)}"


@pytest.mark.parametrize("deterministic", [False, True])
def test_step_around_the_ops_is_autograd_seed_alone(monkeypatch, deterministic):
    """Besides the kernels, a step runs autograd's seed (``ones_like``), the backward's one fill of
    its accumulators (atomic path) or one sort per direction (deterministic): no reduction kernels,
    no zero gradients for the saved outputs, no deterministic-mode fills of the ops' tensors, and no
    host synchronisation (``_local_scalar_dense``, ``item``)."""
    _, torch_counts = _step_launches(monkeypatch, "dense symmetric", deterministic)
    want = {"ones_like": 1, **({"sort": 2} if deterministic else {"zeros": 1})}
    assert dict(torch_counts) == want
