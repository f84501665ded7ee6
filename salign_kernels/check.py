"""Self-check: ``python -m salign_kernels.check``.

Prints the versions that matter and which backends are available (and why not), then runs every
available backend once on a tiny input, for each kind of matching, against the reference: values,
indices and both input gradients. Exits with status 1 if any backend disagrees.
"""

from __future__ import annotations

import platform
import sys
from typing import List

import torch

import salign_kernels
from salign_kernels import _backend, reference

CASES = [  # (label, window, window_mode, symmetric)
    ("dense", None, "sliding", False),
    ("dense symmetric", None, "sliding", True),
    ("sliding k=3", 3, "sliding", False),
    ("partition k=4", 4, "partition", False),
]


def _versions() -> List[str]:
    lines = [
        f"salign_kernels {salign_kernels.__version__}",
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


def _compare(name: str, device: torch.device, window, mode, symmetric) -> float:
    """Largest absolute difference to the reference over the loss, values and gradients."""
    generator = torch.Generator().manual_seed(0)
    shape = (2, 8, 7, 9)
    feats = [torch.randn(shape, generator=generator).to(device) for _ in range(2)]
    mask = (torch.rand(shape[0], shape[2], shape[3], generator=generator) > 0.2).to(device)
    results = []
    for backend_name in ("reference", name):
        a, b = (f.clone().requires_grad_() for f in feats)
        loss = salign_kernels.local_alignment_loss(
            a, b, window=window, window_mode=mode, symmetric=symmetric, mask_b=mask,
            reduction="none", backend=backend_name,
        )
        loss.backward(torch.ones_like(loss))
        results.append((loss.detach(), a.grad, b.grad))
    errors = [(x - y).abs().max().item() for x, y in zip(*results)]
    impl = _backend.select(name, device)
    got = impl.match(feats[0], feats[1], window, mode, None, mask, True)[1]
    want = reference.match(feats[0], feats[1], window, mode, None, mask, True)[1]
    if not torch.equal(got.cpu(), want.cpu()):
        return float("inf")
    return max(errors)


def main() -> int:
    print("\n".join(_versions()))
    print("\nbackends:")
    for name, status in salign_kernels.backends().items():
        print(f"  {name:<10} {'available' if status else 'unavailable: ' + status.reason}")
    if salign_kernels.backends()["cpp"]:
        from salign_kernels.ops import cpu

        print(f"  cpp kernel variant in use: {cpu.capability()} (follows ATEN_CPU_CAPABILITY)")
    print(f"  auto on cpu -> {salign_kernels.resolve_backend('auto', 'cpu')}")
    if torch.cuda.is_available():
        print(f"  auto on cuda -> {salign_kernels.resolve_backend('auto', 'cuda')}")

    failures = 0
    print("\nagreement with the reference (max |difference| over loss, values and gradients):")
    for name, status in salign_kernels.backends().items():
        if name == "reference" or not status:
            continue
        for device in _devices_for(name):
            for label, window, mode, symmetric in CASES:
                error = _compare(name, device, window, mode, symmetric)
                ok = error <= 1e-4
                failures += not ok
                print(f"  {name:<8} {device.type:<5} {label:<16} {'ok' if ok else 'MISMATCH'}  {error:.2e}")
    if failures:
        print(f"\n{failures} check(s) failed")
        return 1
    print("\nall available backends agree with the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
