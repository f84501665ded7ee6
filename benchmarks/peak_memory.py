"""Peak memory of one benchmark step on the CPU, measured in a fresh process.

    python -m benchmarks.peak_memory '{"provider": "cpp", "shape": [8, 64, 64, 64], "mode": "full"}'

prints ``{"peak_extra_mib": ...}``: the growth of the process's peak resident set (``ru_maxrss``)
during one step, over its level once the inputs exist and the provider has run on a tiny problem
(so that libraries' one-time buffers are not counted). A fresh process has no earlier peak to hide
behind, which an in-process measurement of the CPU allocator could not promise.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import torch

from benchmarks.providers import Case, loss_function, make_inputs, run_mode


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure(spec: dict) -> dict:
    case = Case(tuple(spec["shape"]), spec.get("window"), spec.get("window_mode", "sliding"), spec.get("symmetric", False))
    fn = loss_function(spec["provider"], case)
    tiny = Case((1, case.shape[1], 8, 8), None if case.window is None else min(case.window, 7), case.mode, case.symmetric)
    run_mode(loss_function(spec["provider"], tiny), *make_inputs(tiny), "full")
    feat_a, feat_b = make_inputs(case)
    baseline = _peak_kib()
    run_mode(fn, feat_a, feat_b, spec["mode"])
    return {"peak_extra_mib": (_peak_kib() - baseline) / 1024, "threads": torch.get_num_threads()}


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
