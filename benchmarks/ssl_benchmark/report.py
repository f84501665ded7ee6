"""The benchmark's tables and picture, from ``results.json``'s contents."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Dict, List

from .data import CLASSES

START, END = "<!-- ssl-benchmark:start -->", "<!-- ssl-benchmark:end -->"


def mean_std(values: List[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "n/a"
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    missing = f" ({len(values) - len(finite)} empty)" if len(finite) < len(values) else ""
    return f"{statistics.fmean(finite):.3f} ± {std:.3f}{missing}"


def mean_dice(run: Dict) -> float:
    return statistics.fmean(run["dice"][name] for name in CLASSES.values())


def mean_hd95(run: Dict) -> float:
    values = [run["hd95_mm"][name] for name in CLASSES.values()]
    return statistics.fmean(values) if all(math.isfinite(v) for v in values) else math.nan


def methods_in(results: Dict) -> List[str]:
    seen: List[str] = []
    for run in results["runs"]:
        if run["method"] not in seen:
            seen.append(run["method"])
    return seen


def markdown(results: Dict) -> str:
    """Test-template scores per k and method (mean ± std over seeds), the paired difference of mean
    Dice against random init with its sign per seed, then each pre-training's cost (the median over
    seeds: one slow moment of a shared machine moves it less than the mean) and collapse monitor."""
    runs = results["runs"]
    ks = sorted({r["k"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    lines = ["| k | method | GM Dice | WM Dice | mean Dice | Δ vs random (per seed) | HD95 mm (mean of GM, WM) |",
             "|---|---|---|---|---|---|---|"]
    for k in ks:
        baseline = {r["seed"]: mean_dice(r) for r in runs if r["k"] == k and r["method"] == "random"}
        for method in methods_in(results):
            these = sorted((r for r in runs if r["k"] == k and r["method"] == method), key=lambda r: r["seed"])
            if not these:
                continue
            gm = [r["dice"]["grey matter"] for r in these]
            wm = [r["dice"]["white matter"] for r in these]
            if method == "random":
                delta = "—"
            else:
                diffs = [mean_dice(r) - baseline[r["seed"]] for r in these if r["seed"] in baseline]
                signs = " ".join("+" if d > 0 else ("−" if d < 0 else "0") for d in diffs)
                delta = f"{statistics.fmean(diffs):+.3f} ({signs})" if diffs else "n/a"
            lines.append(f"| {k} | {method} | {mean_std(gm)} | {mean_std(wm)} | "
                         f"{mean_std([mean_dice(r) for r in these])} | {delta} | "
                         f"{mean_std([mean_hd95(r) for r in these])} |")
    lines += ["", "| method | pre-training s (median) | loss first → last step | feature spread | "
              "weakest channel std·√C |", "|---|---|---|---|---|"]
    for method in methods_in(results):
        done = [p for p in results["pretrainings"] if p["method"] == method]
        if not done:
            continue
        lines.append(f"| {method} | {statistics.median(p['seconds'] for p in done):.0f} | "
                     f"{statistics.fmean(p['curve'][0] for p in done):.3f} → "
                     f"{statistics.fmean(p['curve'][-1] for p in done):.3f} | "
                     f"{mean_std([p['spread'] for p in done])} | "
                     f"{mean_std([p['min_channel_std_x_sqrt_c'] for p in done])} |")
    args = results["args"]
    lines += ["", f"{len(seeds)} seed(s) {seeds}; pre-training {args['steps']} steps x {args['batch']} at "
              f"{args['size']}²; fine-tuning {args['finetune_steps']} steps, validation every {args['every']}; "
              f"{results['machine']}; whole run {results['seconds'] / 60:.1f} min."]
    return "\n".join(lines)


def picture(results: Dict, path: Path) -> None:
    """Mean test Dice against k, one line per method (error bars: std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    ks = sorted({r["k"] for r in runs})
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, method in enumerate(methods_in(results)):
        means, stds = [], []
        for k in ks:
            values = [mean_dice(r) for r in runs if r["k"] == k and r["method"] == method]
            means.append(statistics.fmean(values))
            stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        offset = [k * (1 + 0.015 * (i - 4)) for k in ks]  # a little apart, so error bars stay readable
        ax.errorbar(offset, means, yerr=stds, marker="o", capsize=3, label=method,
                    ls="--" if method == "random" else "-", color="black" if method == "random" else None)
    ax.set_xscale("log"), ax.set_xticks(ks), ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("labelled slices k"), ax.set_ylabel("mean Dice (GM, WM) on the test template")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Fine-tuned on ICBM152 slices, tested on SPM avg152T1", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replace_readme_section(path: Path, markdown_text: str) -> None:
    """Replace what lies between the README's ssl-benchmark markers with ``markdown_text``.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    text = path.read_text()
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"'{path}' has no '{START}' ... '{END}' section to replace")
    path.write_text(text[:start + len(START)] + "\n" + markdown_text + "\n" + text[end:])


def main(argv=None) -> None:
    """``python -m benchmarks.ssl_benchmark.report results.json [--readme README.md]``: the tables and picture of a
    finished run again (after a change of the report), without running anything."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("results", type=Path, help="a run's results.json")
    p.add_argument("--readme", type=Path, help="a README whose ssl-benchmark section the table replaces")
    args = p.parse_args(argv)
    results = json.loads(args.results.read_text())
    text = markdown(results)
    (args.results.parent / "table.md").write_text(text)
    picture(results, args.results.parent / "ssl_benchmark.png")
    if args.readme is not None:
        replace_readme_section(args.readme, text)
    print(text)


if __name__ == "__main__":
    main()
