"""The GPU check: the GPU tests, then the GPU benchmarks, with every result written as JSON.

    make gpu-check [OUT=dir]             # = PYTHONPATH=. python3 benchmarks/gpu_check.py --out dir
    python3 benchmarks/gpu_check.py --cpu-smoke --out /tmp/smoke   # dry run on CPU (interpreter)

Needs only torch (with CUDA), triton, pytest and pytest-benchmark: no project virtualenv, no
network. Writes into the output folder (default ``benchmarks/results/``):

- ``gpu_tests.xml``: JUnit report of ``tests/test_triton.py`` on the GPU (CUDA tensors, tensor-core
  dtypes, autotuned tiles, the large-map and memory tests);
- ``benchmark.json``: pytest-benchmark's raw results of ``benchmarks/bench_match_gpu.py``, and
  ``benchmark_rows.jsonl``, one line per timing as it is measured;
- ``profile.txt``: ``benchmarks/profile_gpu.py``'s kernel-by-kernel profile of a training step
  and the dense scan's throughput against simpler epilogues;
- ``gpu_check.json`` and ``gpu_check.md``: the environment (device name, versions), the test
  counts, a table of median times and peak memory, and the issue's bars: speed-ups of ``triton``
  over the reference in the same dtype (and over ``torch.compile(reference)``), the dense bf16
  forward's TFLOP/s and its fraction of the device's dense bf16 peak, and whether the largest case
  completed.

Exits non-zero when a test fails or the benchmarks do not run; bars that are missed are reported,
not enforced (they are measurements, not correctness).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The GPU bars: (name, numerator (provider, dtype), denominator (provider, dtype), case, mode, minimum);
# minimum None: reported, no bar.
SPEEDUP_BARS = [
    ("dense bf16 fwd+bwd vs reference bf16", ("reference", "bfloat16"), ("triton", "bfloat16"), "dense", "full", 15.0),
    ("dense fp32 (3xTF32) fwd+bwd vs reference fp32", ("reference", "float32"), ("triton", "float32"), "dense", "full",
     5.0),
    ("dense bf16 fwd+bwd vs compiled reference bf16", ("reference_compiled", "bfloat16"), ("triton", "bfloat16"), "dense",
     "full", 1.0),
    ("dense bf16 fwd+bwd, CUDA graphs vs eager triton", ("triton", "bfloat16"), ("triton_graphs", "bfloat16"), "dense",
     "full", None),
    ("dense bf16 fwd+bwd, fused loss op vs matches reduced in PyTorch", ("triton_composed", "bfloat16"),
     ("triton", "bfloat16"), "dense", "full", None),
    ("sliding k=7 bf16 fwd+bwd, fused loss op vs matches reduced in PyTorch", ("triton_composed", "bfloat16"),
     ("triton", "bfloat16"), "sliding7", "full", None),
    ("dense bf16 fwd+bwd, deterministic backward vs atomics", ("triton_deterministic", "bfloat16"),
     ("triton", "bfloat16"), "dense", "full", None),
    ("dense fp32 (opt-in IEEE products) fwd+bwd vs reference fp32",
     ("reference", "float32"), ("triton_ieee", "float32"), "dense", "full", None),
    ("dense fp32 fwd+bwd vs compiled reference fp32", ("reference_compiled", "float32"), ("triton", "float32"), "dense",
     "full", None),
    ("sliding k=7 bf16 fwd+bwd vs reference bf16", ("reference", "bfloat16"), ("triton", "bfloat16"), "sliding7", "full",
     25.0),
    ("sliding k=7 fp32 fwd+bwd vs reference fp32", ("reference", "float32"), ("triton", "float32"), "sliding7", "full",
     None),
    ("partition k=7 bf16 fwd+bwd vs reference bf16", ("reference", "bfloat16"), ("triton", "bfloat16"), "partition7",
     "full", None),
    ("3D sliding k=5 bf16 fwd+bwd vs reference bf16", ("reference", "bfloat16"), ("triton", "bfloat16"), "sliding5_3d",
     "full", 20.0),
    ("3D dense bf16 fwd+bwd vs chunked reference bf16", ("reference_chunked", "bfloat16"), ("triton", "bfloat16"),
     "dense_3d", "full", None),
]
PEAK_FRACTION_BAR = 0.45


def environment(cpu_smoke: bool) -> dict:
    import torch

    from benchmarks.providers import bf16_peak_tflops

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_smoke": cpu_smoke,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as exc:
        info["triton"] = f"not importable: {exc}"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        info.update(device=name, capability=list(torch.cuda.get_device_capability()),
                    bf16_peak_tflops=bf16_peak_tflops(name), bf16_mm_tflops=measured_mm_tflops(torch.bfloat16),
                    fp32_mm_tflops=measured_mm_tflops(torch.float32))
    else:
        info.update(device="cpu (no CUDA device)", bf16_peak_tflops=None)
    return info


def measured_mm_tflops(dtype, size: int = 8192, repeats: int = 10) -> float:
    """TFLOP/s of one ``size``-cubed ``torch.mm`` in ``dtype`` on the GPU (median of ``repeats``, after
    warm-up, random operands): the ceiling the matching kernels' throughput is read against.
    float32 runs as torch is set (IEEE unless TF32 is allowed)."""
    import torch

    a = torch.randn(size, size, device="cuda").to(dtype)
    b = torch.randn(size, size, device="cuda").to(dtype)
    for _ in range(3):
        torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return 2 * size**3 / sorted(times)[len(times) // 2] / 1e12


def run(cmd, env, timeout, log_path):
    """Run ``cmd`` from the repository root; its output goes to ``log_path``. Returns (rc, seconds).

    At the time limit pytest gets SIGINT first, so that it still writes its reports (JUnit,
    benchmark JSON) for what has run; it is killed if it does not stop within 30 s.
    """
    start = time.time()
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.write(f"\n[gpu_check] stopped at the time limit of {timeout} s\n")
            rc = 124
    return rc, round(time.time() - start, 1)


def _has_xdist() -> bool:
    try:
        import xdist  # noqa: F401
    except ImportError:
        return False
    return True


def junit_summary(path: str) -> dict:
    if not os.path.exists(path):
        return {"error": "no JUnit report"}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = failed
    return counts


def benchmark_rows(rows_path: str, raw_path: str) -> list:
    """The timings: from the JSON lines the benchmark appends as it goes (kept when the run is
    stopped at its time limit), else from pytest-benchmark's JSON."""
    if os.path.exists(rows_path):
        with open(rows_path) as f:
            return [json.loads(line) for line in f if line.strip()]
    if not os.path.exists(raw_path):
        return []
    with open(raw_path) as f:
        data = json.load(f)
    rows = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        stats = bench["stats"]
        rows.append(dict(
            case=info.get("case"), provider=info.get("provider"), dtype=info.get("dtype"), mode=info.get("mode"),
            shape=info.get("shape"), median_ms=stats["median"] * 1e3, min_ms=stats["min"] * 1e3,
            rounds=stats["rounds"], peak_memory_mib=info.get("peak_memory_mib"), gflop=info.get("gflop"),
        ))
    return rows


def bars(rows: list, peak_tflops, mm_tflops=None) -> list:
    def median(provider, dtype, case, mode):
        for row in rows:
            if (row["provider"], row["dtype"], row["case"], row["mode"]) == (provider, dtype, case, mode):
                return row["median_ms"]
        return None

    results = []
    for name, (num_p, num_d), (den_p, den_d), case, mode, minimum in SPEEDUP_BARS:
        slow, fast = median(num_p, num_d, case, mode), median(den_p, den_d, case, mode)
        ratio = slow / fast if slow and fast else None
        results.append(dict(bar=name, value=ratio, unit="x", minimum=minimum,
                            met=None if ratio is None or minimum is None else ratio >= minimum))
    forward = [r for r in rows if (r["provider"], r["dtype"], r["case"], r["mode"]) == ("triton", "bfloat16", "dense", "forward")]
    if forward and forward[0]["gflop"]:
        tflops = forward[0]["gflop"] * 1e9 / (forward[0]["median_ms"] * 1e-3) / 1e12
        fraction = tflops / peak_tflops if peak_tflops else None
        results.append(dict(bar="dense bf16 forward TFLOP/s", value=tflops, unit="TFLOP/s", minimum=None, met=None))
        results.append(dict(bar="dense bf16 forward fraction of the dense bf16 peak", value=fraction, unit="",
                            minimum=PEAK_FRACTION_BAR, met=None if fraction is None else fraction >= PEAK_FRACTION_BAR))
        if mm_tflops:
            results.append(dict(bar="dense bf16 forward fraction of torch.mm's bf16 rate measured here",
                                value=tflops / mm_tflops, unit="", minimum=None, met=None))
    for dtype in ("bfloat16", "float32"):  # informs the choice of the symmetric default, no bar
        fused = median("triton", dtype, "dense_symmetric", "full")
        two = median("triton_two_pass", dtype, "dense_symmetric", "full")
        results.append(dict(bar=f"dense symmetric {dtype} fwd+bwd: two passes / fused pass",
                            value=two / fused if two and fused else None, unit="x", minimum=None, met=None))
    large = [r for r in rows if (r["provider"], r["case"], r["mode"]) == ("triton", "dense_large", "full")]
    results.append(dict(bar="(4, 128, 256, 256) bf16 fwd+bwd completes", value=large[0]["median_ms"] if large else None,
                        unit="ms", minimum=None, met=bool(large)))
    return results


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# GPU check: {env.get('device')}",
        "",
        f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, Python {env['python']}"
        + (f"; torch.mm 8192^3 measured here: bf16 {env['bf16_mm_tflops']:.0f} TFLOP/s, "
           f"fp32 {env['fp32_mm_tflops']:.0f} TFLOP/s" if env.get("bf16_mm_tflops") else "")
        + ("  \n**CPU smoke run: not a measurement.**" if env["cpu_smoke"] else ""),
        "",
        "## Tests",
        "",
        "```",
        json.dumps(report.get("tests", {}), indent=1),
        "```",
        "",
        "## Bars",
        "",
        "| bar | value | minimum | met |",
        "|---|---|---|---|",
    ]
    for bar in report.get("bars", []):
        value = "n/a" if bar["value"] is None else f"{bar['value']:.3g} {bar['unit']}".strip()
        lines.append(f"| {bar['bar']} | {value} | {bar['minimum'] if bar['minimum'] is not None else ''} | {bar['met']} |")
    lines += ["", "## Timings (median of the rounds)", "",
              "| case | mode | provider | dtype | median ms | peak memory MiB |", "|---|---|---|---|---|---|"]
    for row in sorted(report.get("benchmarks", []), key=lambda r: (r["case"], r["mode"], r["median_ms"])):
        peak = "" if row["peak_memory_mib"] is None else f"{row['peak_memory_mib']:.0f}"
        lines.append(f"| {row['case']} | {row['mode']} | {row['provider']} | {row['dtype']} | {row['median_ms']:.3f} | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="output folder")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="dry run on CPU through Triton's interpreter, tiny shapes: checks this script, measures nothing")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--skip-profile", action="store_true")
    parser.add_argument("--profile-timeout", type=int, default=120, help="seconds for benchmarks/profile_gpu.py")
    parser.add_argument("--tests-timeout", type=int, default=240, help="seconds for the GPU tests (about 130 on an H200)")
    parser.add_argument("--bench-timeout", type=int, default=300, help="seconds for the benchmarks")
    parser.add_argument("--test-workers", type=int, default=8,
                        help="pytest-xdist processes for the GPU tests (they mostly wait on Triton's compiler); "
                             "0: one process")
    args = parser.parse_args(argv)

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    if args.cpu_smoke:
        env["TRITON_INTERPRET"] = "1"
        env["SALIGN_BENCH_SMOKE"] = "1"
    else:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here (use --cpu-smoke for a dry run on CPU)", file=sys.stderr)
            return 2

    report = {"environment": environment(args.cpu_smoke), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(json.dumps(report["environment"]))
    status = 0

    if not args.skip_tests:
        junit = os.path.join(out, "gpu_tests.xml")
        cmd = [sys.executable, "-m", "pytest", "tests/test_triton.py", "-q", "-rfE", "-p", "no:cacheprovider",
               f"--junitxml={junit}"]
        if args.cpu_smoke:  # a handful of interpreter tests: the point is the plumbing
            cmd += ["-k", "tile_edges and shape0"]
        elif args.test_workers > 0 and _has_xdist():
            cmd += ["-n", str(args.test_workers)]
        rc, seconds = run(cmd, env, args.tests_timeout, os.path.join(out, "gpu_tests.log"))
        report["tests"] = dict(junit_summary(junit), returncode=rc, seconds=seconds)
        print(f"tests: rc={rc} in {seconds} s: {report['tests'].get('passed')} passed, "
              f"{report['tests'].get('failures')} failed, {report['tests'].get('skipped')} skipped")
        status |= rc != 0

    if not args.skip_bench:
        raw = os.path.join(out, "benchmark.json")
        rows_path = os.path.join(out, "benchmark_rows.jsonl")
        for stale in (raw, rows_path):
            if os.path.exists(stale):
                os.remove(stale)
        env["SALIGN_BENCH_ROWS"] = rows_path
        env["SALIGN_BENCH_GPU"] = "1"
        env.setdefault("TRITON_PRINT_AUTOTUNING", "1")  # the chosen tiles, into benchmark.log
        cmd = [sys.executable, "-m", "pytest", "benchmarks/bench_match_gpu.py", "-q", "-p", "no:cacheprovider",
               "-o", "python_files=bench_*.py", "-o", "python_functions=bench_*",
               f"--benchmark-json={raw}", "--benchmark-disable-gc", "--benchmark-columns=min,median,max,rounds"]
        rc, seconds = run(cmd, env, args.bench_timeout, os.path.join(out, "benchmark.log"))
        report["benchmark_run"] = dict(returncode=rc, seconds=seconds)
        rows = benchmark_rows(rows_path, raw)
        report["benchmarks"] = rows
        report["bars"] = bars(rows, report["environment"].get("bf16_peak_tflops"),
                                report["environment"].get("bf16_mm_tflops"))
        print(f"benchmarks: rc={rc} in {seconds} s, {len(rows)} timings")
        for bar in report["bars"]:
            print(f"  {bar['bar']}: {bar['value']} {bar['unit']} (met: {bar['met']})")
        status |= rc != 0 or not rows

    if not args.skip_profile and not args.cpu_smoke:  # where the time of a step goes: profile.txt
        rc, seconds = run([sys.executable, "benchmarks/profile_gpu.py", "--out", out], env, args.profile_timeout,
                          os.path.join(out, "profile.log"))
        report["profile"] = dict(returncode=rc, seconds=seconds)
        if os.path.exists(os.path.join(out, "profile.txt")):
            os.remove(os.path.join(out, "profile.log"))  # its content is in profile.txt

    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write(markdown(report))
    print(f"results in {out}")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
