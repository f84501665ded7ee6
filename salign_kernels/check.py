"""Self-check: ``python -m salign_kernels.check``.

Prints the versions that matter, which copy of the package was imported (a source tree on
``sys.path``, e.g. the current directory, shadows an installed package), which backends are
available (and why not) and where the C++ extension came from (prebuilt, or compiled at first use
and cached), then runs every available compiled backend once on a tiny input, for each kind of
matching in 2D and 3D, against the reference: values, indices and both input gradients. Says which
backends it compared and how many comparisons it made, and exits with status 1 if any backend
disagrees (or if there was nothing to compare).
"""

from __future__ import annotations

import os
import platform
import sys
from typing import List

import torch

import salign_kernels
from salign_kernels import _backend

CASES = [  # (label, shape, window, window_mode, symmetric)
    ("dense", (2, 8, 7, 9), None, "sliding", False),
    ("dense symmetric", (2, 8, 7, 9), None, "sliding", True),
    ("sliding k=3", (2, 8, 7, 9), 3, "sliding", False),
    ("partition k=4", (2, 8, 7, 9), 4, "partition", False),
    ("3D dense", (2, 8, 3, 5, 6), None, "sliding", True),
    ("3D sliding (3,3,5)", (2, 8, 3, 5, 6), (3, 3, 5), "sliding", False),
    ("3D partition k=2", (2, 8, 3, 5, 6), 2, "partition", False),
]


def _package_directory() -> str:
    """The directory the package was imported from: an installed copy, or a source tree that
    shadows it (the current directory comes first on ``sys.path``)."""
    return os.path.dirname(os.path.abspath(salign_kernels.__file__))


def _versions() -> List[str]:
    lines = [
        f"salign_kernels {salign_kernels.__version__} from {_package_directory()}",
        f"python {platform.python_version()} ({platform.machine()})",
        f"torch {torch.__version__} (threads: {torch.get_num_threads()})",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton not installed")
    if torch.cuda.is_available():
        lines.append(f"cuda {torch.version.cuda}: {torch.cuda.get_device_name()}")
    else:
        lines.append("cuda: no device")
    return lines


def _devices_for(name: str) -> List[torch.device]:
    module, _ = _backend._load(name)
    candidates = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [d for d in candidates if module.supports(d)]


def _compare(name: str, device: torch.device, shape, window, mode, symmetric) -> float:
    """Largest absolute difference to the reference over the loss, values and gradients (inf when
    the indices differ)."""
    generator = torch.Generator().manual_seed(0)
    feats = [torch.randn(shape, generator=generator).to(device) for _ in range(2)]
    mask = (torch.rand(shape[0], *shape[2:], generator=generator) > 0.2).to(device)
    results = []
    for backend_name in ("reference", name):
        a, b = (f.clone().requires_grad_() for f in feats)
        loss = salign_kernels.local_alignment_loss(
            a, b, window=window, window_mode=mode, symmetric=symmetric, mask_b=mask,
            reduction="none", backend=backend_name,
        )
        loss.backward(torch.ones_like(loss))
        indices = salign_kernels.window_match(a, b, window, mode=mode, mask_b=mask, backend=backend_name)[1] \
            if window is not None else salign_kernels.dense_match(a, b, mask_b=mask, backend=backend_name)[1]
        results.append((loss.detach(), a.grad, b.grad, indices))
    (*want, want_indices), (*got, got_indices) = results
    if not torch.equal(got_indices.cpu(), want_indices.cpu()):
        return float("inf")
    return max((x - y).abs().max().item() for x, y in zip(got, want))


def _origin(extension) -> str:
    if extension.origin == "prebuilt":
        return f"prebuilt, {extension.path}"
    return f"compiled at first use, cached in {extension.path}"


def main() -> int:
    print("\n".join(_versions()))
    print("\nbackends:")
    for name, status in salign_kernels.backends().items():
        print(f"  {name:<10} {'available' if status else 'unavailable: ' + status.reason}")
    if salign_kernels.backends()["cpp"]:
        from salign_kernels.ops import cpp

        print(f"  cpp extension: {_origin(cpp.EXTENSION)}")
        print(f"  cpp kernel variant in use: {cpp.capability()} (follows ATEN_CPU_CAPABILITY)")
    print(f"  auto on cpu -> {salign_kernels.resolve_backend('auto', 'cpu')}")
    if torch.cuda.is_available():
        print(f"  auto on cuda -> {salign_kernels.resolve_backend('auto', 'cuda')}")

    failures = compared = 0
    pairs = []  # "<backend> on <device type>", each compared with the reference
    print("\nagreement with the reference (max |difference| over loss, values and gradients):")
    for name, status in salign_kernels.backends().items():
        if name == "reference" or not status:
            continue
        for device in _devices_for(name):
            pairs.append(f"{name} on {device.type}")
            for label, shape, window, mode, symmetric in CASES:
                error = _compare(name, device, shape, window, mode, symmetric)
                ok = error <= 1e-4
                failures += not ok
                compared += 1
                print(f"  {name:<8} {device.type:<5} {label:<20} {'ok' if ok else 'MISMATCH'}  {error:.2e}")
    if compared == 0:
        print("\nno compiled backend is available here: nothing was compared with the reference "
              "(the reference alone runs, slowly); see the reasons above")
        return 1
    if failures:
        print(f"\n{failures} of {compared} check(s) failed (compared with the reference: {', '.join(pairs)})")
        return 1
    print(f"\nall {compared} checks agree with the reference (compared with it: {', '.join(pairs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
