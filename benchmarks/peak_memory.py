"""Peak memory of one benchmark step on the CPU, measured in a fresh process.

    python -m benchmarks.peak_memory '{"provider": "cpp", "shape": [8, 64, 64, 64], "mode": "full"}'

prints ``{"peak_extra_mib": ...}``: how far the process's resident set rises during one step above
its level once the inputs exist and the provider has run on a tiny problem (so that libraries'
one-time buffers are not counted). A fresh process has no freed-but-kept allocator memory to hide
the step's allocations in.

The peak is the kernel's high-water mark of this process's memory (``VmHWM`` in
``/proc/self/status``), reset to the current size before the step (``/proc/self/clear_refs``).
``ru_maxrss`` would not do: Linux carries it over ``exec`` from the parent, so a child of a large
benchmark process would report the parent's peak.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import torch

from benchmarks.providers import Case, loss_function, make_inputs, run_mode


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> bool:
    """Reset the high-water mark to the current resident size; False where Linux cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(spec: dict) -> dict:
    window = spec.get("window")
    window = tuple(window) if isinstance(window, list) else window
    case = Case(tuple(spec["shape"]), window, spec.get("window_mode", "sliding"), spec.get("symmetric", False))
    fn = loss_function(spec["provider"], case)
    tiny_spatial = (8,) * len(case.spatial)
    tiny_window = None if case.window is None else tuple(min(k, 7) for k in case.windows)
    tiny = Case((1, case.shape[1], *tiny_spatial), tiny_window, case.mode, case.symmetric)
    run_mode(loss_function(spec["provider"], tiny), *make_inputs(tiny), "full")
    feat_a, feat_b = make_inputs(case)
    if _reset_peak():
        baseline = _status_kib("VmRSS")
        run_mode(fn, feat_a, feat_b, spec["mode"])
        peak = _status_kib("VmHWM")
    else:  # no resettable high-water mark: the lifetime peak, exact only in a fresh process
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run_mode(fn, feat_a, feat_b, spec["mode"])
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_extra_mib": max(0, peak - baseline) / 1024, "threads": torch.get_num_threads()}


def measure_in_subprocess(spec: dict, timeout: float = 1800) -> dict:
    """:func:`measure` in a child process; ``{"error": ...}`` if it fails (e.g. out of memory)."""
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.peak_memory", json.dumps(spec)],
        capture_output=True, text=True, timeout=timeout,
    )
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["exit status %d" % result.returncode])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
