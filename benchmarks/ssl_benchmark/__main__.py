"""Does SAL help? Pre-train every method with one budget, fine-tune with k labelled slices, test on an
independent template.

    python -m benchmarks.ssl_benchmark                 # the full benchmark (make ssl-benchmark)
    python -m benchmarks.ssl_benchmark --quick         # one seed of every method, tiny sizes: a smoke run
    python -m benchmarks.ssl_benchmark --methods SAL-LA SimCLR --seeds 0 --k 3

Writes ``--out`` (default ``outputs/ssl_benchmark``): ``results.json`` (every run, its slices, curves
and timings), ``table.md`` and ``ssl_benchmark.png``; ``--readme README.md`` replaces the README's
section between the ``ssl-benchmark`` markers with the table and its protocol.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from . import data, protocol, report
from .methods import METHODS

DEFAULTS = {"steps": 200, "batch": 16, "size": 64, "finetune_steps": 150, "every": 25}
QUICK = {"steps": 2, "batch": 4, "size": 32, "finetune_steps": 4, "every": 2}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ssl_benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one seed, k = 1, tiny sizes; pre-training on the "
                   "bundled sample only (no scans gathered)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                   help="pre-training methods (random init is always run)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--k", type=int, nargs="+", default=[1, 3, 10], help="labelled slices per fine-tuning")
    p.add_argument("--steps", type=int, help=f"pre-training steps (default {DEFAULTS['steps']})")
    p.add_argument("--batch", type=int, help=f"pre-training batch, pairs or slices (default {DEFAULTS['batch']})")
    p.add_argument("--size", type=int, help=f"slice side, a multiple of 16 (default {DEFAULTS['size']})")
    p.add_argument("--finetune-steps", type=int, help=f"default {DEFAULTS['finetune_steps']}")
    p.add_argument("--every", type=int, help="validation check every this many fine-tuning steps "
                   f"(default {DEFAULTS['every']})")
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--train-slab", type=float, nargs=2, default=[0.25, 0.6],
                   help="fine-tuning pool: positions of the source's axial slices")
    p.add_argument("--val-slab", type=float, nargs=2, default=[0.65, 0.85], help="validation slices")
    p.add_argument("--cache", type=Path, default=Path("outputs/ssl_benchmark/cache"),
                   help="downloads and gathered scans (kept between runs)")
    p.add_argument("--out", type=Path, default=Path("outputs/ssl_benchmark"))
    p.add_argument("--readme", type=Path, help="a README whose ssl-benchmark section the table replaces")
    p.add_argument("--device", default="auto")
    return p


def check_args(args) -> None:
    for flag in ("steps", "batch", "finetune_steps", "every"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 1; got {getattr(args, flag)}")
    if args.size < 16 or args.size % 16:
        raise SystemExit(f"--size must be a multiple of 16; got {args.size}")
    if max(args.train_slab) >= min(args.val_slab):
        raise SystemExit("--val-slab must lie above --train-slab (no slice in both)")


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.seeds, args.k = args.seeds[:1], [min(args.k)]
    check_args(args)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    started = time.perf_counter()

    source = data.fine_tuning_source(args.size)
    pool, val_slices = data.slab(source, *args.train_slab), data.slab(source, *args.val_slab)
    if len(pool) < max(args.k):
        raise SystemExit(f"--train-slab holds {len(pool)} slices, fewer than k = {max(args.k)}")
    val = data.take(source, val_slices)
    test_stack, test_spacing = data.test_template(args.cache, args.size)
    test = data.take(test_stack, range(test_stack.num_slices))
    volumes = data.pretraining_volumes(args.cache, gather=not args.quick)
    budget = protocol.Budget(steps=args.steps, batch=args.batch, size=args.size)
    dataset = protocol.pair_dataset(volumes, budget)
    print(f"pre-training: {len(volumes)} volumes ({', '.join(p.name for p in volumes)}); "
          f"{budget.steps} steps x {budget.batch} at {budget.size}^2 per method")
    print(f"fine-tuning: {Path(source.path).name}, pool slices {pool[0]}-{pool[-1]}, validation "
          f"{val_slices[0]}-{val_slices[-1]} of {source.num_slices}; test: {Path(test_stack.path).name}, "
          f"{test_stack.num_slices} slices; k = {args.k}; seeds {args.seeds}; {args.finetune_steps} steps")

    pretrainings, runs = [], []
    for seed in args.seeds:
        init = protocol.random_init(seed)
        for name in ["random", *args.methods]:
            encoder = {}
            if name != "random":
                done = protocol.pretrain(name, dataset, budget, seed, device)
                encoder = done.pop("encoder")
                pretrainings.append({"method": name, "seed": seed, **done})
                print(f"seed {seed} {name:<13} pre-trained in {done['seconds']:6.1f} s: loss "
                      f"{done['curve'][0]:.3f} -> {done['curve'][-1]:.3f}, spread {done['spread']:.3f}")
            for k in args.k:
                chosen = protocol.choose_slices(pool, k, seed)
                run = protocol.finetune_and_test({**init, **encoder}, data.take(source, chosen), val, test,
                                                 test_spacing, seed=seed, steps=args.finetune_steps,
                                                 lr=args.finetune_lr, every=args.every, device=device)
                run.update(method=name, seed=seed, k=k, slices=chosen.tolist())
                runs.append(run)
                dice = run["dice"]
                print(f"seed {seed} {name:<13} k {k:>2}: test Dice GM {dice['grey matter']:.3f} "
                      f"WM {dice['white matter']:.3f} (val {run['val_dice']:.3f} at step {run['best_step']}, "
                      f"{run['seconds']:.0f} s)")

    seconds = time.perf_counter() - started
    results = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                          f"torch {torch.__version__}, device {device}",
               "seconds": seconds, "volumes": [p.name for p in volumes], "test_spacing_mm": test_spacing,
               "pretrainings": pretrainings, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    markdown = report.markdown(results)
    (args.out / "table.md").write_text(markdown)
    report.picture(results, args.out / "ssl_benchmark.png")
    if args.readme is not None:
        report.replace_readme_section(args.readme, markdown)
    print("\n" + markdown)
    print(f"\n{len(runs)} fine-tunings, {len(pretrainings)} pre-trainings in {seconds / 60:.1f} min; wrote "
          f"{args.out / 'results.json'}, {args.out / 'table.md'}, {args.out / 'ssl_benchmark.png'}")
    return results


if __name__ == "__main__":
    main()
