"""Compare the available backends on random features: loss, time and peak memory.

    python examples/compare_backends.py [--shape B C H W | --shape B C D H W] [--window K] [--repeats R]

Each (backend, matching) case runs forward + backward in a fresh subprocess, so its peak resident
memory (``ru_maxrss``) can be reported above the process's baseline after the inputs exist.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import torch

import salign_kernels as sk


def run_case(backend: str, shape, window, repeats: int) -> dict:
    """Forward + backward of the LA loss; runs inside the child process."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(shape, generator=generator).requires_grad_()
    b = torch.randn(shape, generator=generator).requires_grad_()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = sk.local_alignment_loss(a, b, window=window, backend=backend)
        loss.backward()
        times.append(time.perf_counter() - start)
        a.grad = b.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"loss": loss.item(), "seconds": sorted(times)[len(times) // 2], "peak_mib": (peak - baseline) / 1024}


def runs_on_cpu(backend: str) -> bool:
    try:
        sk.resolve_backend(backend, "cpu")
    except sk.BackendUnavailableError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs="+", default=[4, 64, 48, 48],
                        help="B C H W (slices) or B C D H W (sub-volumes)")
    parser.add_argument("--window", type=int, default=7, help="window of the windowed case (odd)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        backend, window = json.loads(args.child)
        print(json.dumps(run_case(backend, tuple(args.shape), window, args.repeats)))
        return

    if len(args.shape) not in (4, 5) or min(args.shape) < 1:
        parser.error(f"--shape takes B C H W or B C D H W, all >= 1; got {args.shape}")
    available = [name for name, status in sk.backends().items() if status and runs_on_cpu(name)]
    B, N = args.shape[0], math.prod(args.shape[2:])
    axes = "(B, C, H, W)" if len(args.shape) == 4 else "(B, C, D, H, W)"
    print(f"local alignment loss, forward + backward, features {axes} = {tuple(args.shape)}, N = {N}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; backends here: {', '.join(available)}\n")
    print(f"{'matching':<18}{'backend':<12}{'loss':>10}{'time (ms)':>12}{'peak extra (MiB)':>18}")
    for label, window in (("dense", None), (f"sliding k={args.window}", args.window)):
        for backend in available:
            child = [sys.executable, __file__, "--child", json.dumps([backend, window]),
                     "--shape", *map(str, args.shape), "--repeats", str(args.repeats)]
            result = json.loads(subprocess.run(child, capture_output=True, text=True, check=True).stdout)
            print(f"{label:<18}{backend:<12}{result['loss']:>10.5f}{1e3 * result['seconds']:>12.1f}"
                  f"{result['peak_mib']:>18.1f}")
    print(f"\nthe dense similarity matrix alone is B*N*N*4 bytes = {B * N ** 2 * 4 / 2**20:.0f} MiB here")


if __name__ == "__main__":
    main()
