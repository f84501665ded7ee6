"""Render pytest-benchmark JSON into the README's tables, a summary of the speed bars, and a plot.

    python -m benchmarks.render benchmarks/results/cpu.json --out benchmarks/results

writes ``<name>.md`` (tables), ``<name>-summary.json`` (the bars: measured ratio, goal, met) and
``<name>.png`` (speed-ups of the full step) beside each other; with ``--readme README.md`` the
tables also replace the README's benchmark section (between its markers).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

# (description, case label, shape size or None, mode, what is compared, goal)
BARS = [
    ("dense one-way forward+backward at M, cpp vs reference", "dense", "M", "full", "speedup", 6.0),
    ("dense one-way forward+backward at L, cpp vs reference", "dense", "L", "full", "speedup", 6.0),
    ("dense forward at M, cpp GFLOP/s as a share of torch.mm's", "dense", "M", "forward", "mm_share", 0.60),
    ("peak extra memory of forward+backward at L, cpp / reference", "dense", "L", "full", "memory_share", 0.05),
    ("sliding k=7 forward+backward, cpp vs reference", "sliding k=7", None, "full", "speedup", 10.0),
    ("partition k=7 forward+backward, cpp vs reference", "partition k=7", None, "full", "speedup", 1.0),
    ("partition k=15 forward+backward, cpp vs reference", "partition k=15", None, "full", "speedup", 1.0),
    ("sliding k=7 forward, cpp GFLOP/s (real candidates) as a share of torch.mm's", "sliding k=7", None,
     "forward", "mm_share", 0.40),
    ("partition k=15 forward, cpp GFLOP/s (real candidates) as a share of torch.mm's", "partition k=15", None,
     "forward", "mm_share", 1.00),
    ("3D sliding k=5 forward, cpp GFLOP/s (real candidates) as a share of torch.mm's", "sliding k=5 3D", None,
     "forward", "mm_share", 0.40),
    ("3D dense forward+backward, cpp vs reference", "dense 3D", None, "full", "speedup", 6.0),
    ("3D sliding k=5 forward+backward, cpp vs reference", "sliding k=5 3D", None, "full", "speedup", 10.0),
]


def load(path):
    with open(path) as f:
        data = json.load(f)
    rows = []
    for bench in data["benchmarks"]:
        info = dict(bench["extra_info"])
        info["median_s"] = bench["stats"]["median"]
        info.setdefault("size", "")
        rows.append(info)
    return data, rows


def index(rows):
    table = {}
    for r in rows:
        table[(r["case"], r.get("size", ""), r["mode"], r["provider"])] = r
    return table


def fmt_time(seconds):
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def fmt_memory(row):
    if row is None:
        return ""
    if "peak_extra_mib" in row:
        return f"{row['peak_extra_mib']:.0f} MiB"
    return "n/a" if "error" not in row else "failed"


def bar_value(table, case, size, mode, kind):
    size = size or ""
    cpp = table.get((case, size, mode, "cpp"))
    ref = table.get((case, size, mode, "reference"))
    if kind == "speedup":
        return None if not (cpp and ref) else ref["median_s"] / cpp["median_s"]
    if kind == "memory_share":
        if not (cpp and ref) or "peak_extra_mib" not in cpp or not ref.get("peak_extra_mib"):
            return None
        return cpp["peak_extra_mib"] / ref["peak_extra_mib"]
    if kind == "mm_share":
        mm = table.get(("mm", "", "forward", "torch.mm"))
        if not (cpp and mm):
            return None
        return (cpp["gflop"] / cpp["median_s"]) / (mm["gflop"] / mm["median_s"])
    raise ValueError(kind)


def summarize(table):
    summary = []
    for description, case, size, mode, kind, goal in BARS:
        value = bar_value(table, case, size, mode, kind)
        met = None if value is None else (value <= goal if kind == "memory_share" else value >= goal)
        summary.append(dict(bar=description, measured=value, goal=goal, kind=kind, met=met))
    return summary


def markdown(data, rows, summary):
    table = index(rows)
    first = rows[0]
    variant = next((r["kernel_variant"] for r in rows if "kernel_variant" in r), "n/a")
    lines = [
        f"Measured on {first['device']}, {first['threads']} threads, torch {first.get('torch', '')}, "
        f"C++ kernels: {variant}; {data.get('datetime', '')[:10]}. Median time per step; "
        "peak extra memory of one step in a fresh process (RSS growth).",
        "",
        "| case | shape (B, C, [D,] H, W) | mode | reference | reference_chunked | cpp | cpp speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    cases = sorted({(r["case"], r["size"], tuple(r["shape"]), r["mode"]) for r in rows if r["case"] != "mm"},
                   key=lambda c: (c[0] != "dense", c[0], "SML".find(c[1]) if c[1] else 0, ["forward", "backward", "full"].index(c[3])))
    for case, size, shape, mode in cases:
        cells = []
        for provider in ("reference", "reference_chunked", "cpp"):
            row = table.get((case, size, mode, provider))
            if row is None:
                cells.append("")
                continue
            memory = fmt_memory(row) if mode != "backward" else ""
            cells.append(fmt_time(row["median_s"]) + (f" / {memory}" if memory else ""))
        ref, cpp = table.get((case, size, mode, "reference")), table.get((case, size, mode, "cpp"))
        speedup = f"{ref['median_s'] / cpp['median_s']:.1f}x" if ref and cpp else ""
        label = f"{case} {size}".strip()
        lines.append(f"| {label} | {tuple(shape)} | {mode} | " + " | ".join(cells) + f" | {speedup} |")

    fused = [(m, table.get(("dense symmetric", "M", m, "cpp")), table.get(("dense symmetric", "M", m, "cpp_two_pass")))
             for m in ("forward", "full")]
    if any(f and t for _, f, t in fused):
        lines += ["", "Symmetric dense loss at M, both directions from one pass (cpp) or two one-way passes:", ""]
        lines += ["| mode | one fused pass | two passes | fused speed-up |", "|---|---|---|---|"]
        for mode, f, t in fused:
            if f and t:
                lines.append(f"| {mode} | {fmt_time(f['median_s'])} | {fmt_time(t['median_s'])} | {t['median_s'] / f['median_s']:.2f}x |")

    mm = table.get(("mm", "", "forward", "torch.mm"))
    if mm:
        mm_rate = mm["gflop"] / mm["median_s"]
        lines += ["", f"torch.mm on 4096x512 @ 512x4096 in the same run: {mm_rate:.0f} GFLOP/s. Dense forward throughput "
                  "(2·B·N²·C flops per direction):", "", "| shape | reference | cpp | cpp / torch.mm |", "|---|---|---|---|"]
        for size in "SML":
            ref, cpp = table.get(("dense", size, "forward", "reference")), table.get(("dense", size, "forward", "cpp"))
            if cpp:
                rate = cpp["gflop"] / cpp["median_s"]
                ref_rate = f"{ref['gflop'] / ref['median_s']:.0f} GFLOP/s" if ref else ""
                lines.append(f"| {size} | {ref_rate} | {rate:.0f} GFLOP/s | {100 * rate / mm_rate:.0f}% |")
        windowed = sorted({(r["case"], tuple(r["shape"])) for r in rows
                           if r["mode"] == "forward" and r["provider"] == "cpp" and r.get("window") is not None})
        if windowed:
            lines += ["", "Windowed and 3D forward throughput (2·C flops per (query, candidate) pair, counting only the "
                      "real candidates: borders clipped, ragged tiles):", "",
                      "| case | shape | reference | cpp | cpp / torch.mm |", "|---|---|---|---|---|"]
            for case, shape in windowed + [("dense 3D", None)]:
                cpp, ref = table.get((case, "", "forward", "cpp")), table.get((case, "", "forward", "reference"))
                if not cpp:
                    continue
                rate = cpp["gflop"] / cpp["median_s"]
                ref_rate = f"{ref['gflop'] / ref['median_s']:.0f} GFLOP/s" if ref else ""
                lines.append(f"| {case} | {tuple(cpp['shape'])} | {ref_rate} | {rate:.0f} GFLOP/s | "
                             f"{100 * rate / mm_rate:.0f}% |")

    lines += ["", "| goal | measured | target | met |", "|---|---|---|---|"]
    for s in summary:
        if s["measured"] is None:
            lines.append(f"| {s['bar']} | not measured | | |")
            continue
        value = f"{100 * s['measured']:.1f}%" if s["kind"] != "speedup" else f"{s['measured']:.1f}x"
        target = (f"<= {100 * s['goal']:.0f}%" if s["kind"] == "memory_share" else
                  f">= {100 * s['goal']:.0f}%" if s["kind"] == "mm_share" else f">= {s['goal']:.0f}x")
        lines.append(f"| {s['bar']} | {value} | {target} | {'yes' if s['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    table = index(rows)
    labels, speedups = [], defaultdict(list)
    for case, size, mode, provider in sorted(table):
        if mode != "full" or provider != "reference":
            continue
        label = f"{case} {size}".strip()
        labels.append(label)
        for other in ("reference_chunked", "cpp"):
            row = table.get((case, size, mode, other))
            speedups[other].append(table[(case, size, mode, "reference")]["median_s"] / row["median_s"] if row else 0)
    if not labels:
        return False
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 3.5))
    width = 0.38
    for i, (provider, values) in enumerate(speedups.items()):
        ax.bar([x + (i - 0.5) * width for x in range(len(labels))], values, width, label=provider)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set_ylabel("speed-up over reference\n(forward + backward)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


README_START = "<!-- cpu-benchmarks:start (written by make bench) -->"
README_END = "<!-- cpu-benchmarks:end -->"


def update_readme(path: str, text: str) -> None:
    """Replace the text between the README's benchmark markers with ``text``."""
    with open(path) as f:
        readme = f.read()
    if README_START not in readme or README_END not in readme:
        raise SystemExit(f"{path} has no benchmark markers ({README_START} ... {README_END})")
    head, rest = readme.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    with open(path, "w") as f:
        f.write(head + README_START + "\n" + text + README_END + tail)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="pytest-benchmark JSON")
    parser.add_argument("--out", default=None, help="folder for the outputs (default: beside the JSON)")
    parser.add_argument("--readme", default=None, help="a README whose benchmark section to rewrite")
    args = parser.parse_args()
    data, rows = load(args.results)
    out = args.out or os.path.dirname(args.results)
    os.makedirs(out, exist_ok=True)
    name = os.path.splitext(os.path.basename(args.results))[0]
    summary = summarize(index(rows))
    text = markdown(data, rows, summary)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, f"{name}-summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot(rows, os.path.join(out, f"{name}.png"))
    if args.readme:
        update_readme(args.readme, text)
    print(text)


if __name__ == "__main__":
    main()
