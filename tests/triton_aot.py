"""Compile every Triton kernel launch of the package for an NVIDIA GPU, on a machine without one.

    python tests/triton_aot.py [--arch 90] [--only SUBSTRING]

Triton's interpreter runs the kernels' Python but never their compiler, which rejects things the
interpreter accepts (a global that is not ``tl.constexpr``, a ``tl.dot`` of mismatched dtypes, a
tile that overflows shared memory). Here the launchers run on CPU tensors with each kernel replaced
by a recorder, and every recorded launch (each autotuning configuration too) is compiled by
Triton's own NVIDIA pipeline, down to a cubin for the chosen architecture: what the first call on a
GPU would do. Signature, constexprs and specialisation attributes (``tt.divisibility=16`` on aligned
pointers and on ints divisible by 16) come from Triton's own binder, as in ``JITFunction.run``, so
the cubin is the JIT's (without the attributes loads are scalar, nothing is pipelined and shared
memory is under-reported). Each cubin is then read by ``sass_census`` (tensor cores, spills,
fences, hot loop, occupancy).

Prints one JSON object per distinct compile (with its ``census``), then a summary line holding the
per-compile table (also printed on stderr); exits 1 on any failure. ``--only`` compiles only the
kernels whose name contains the substring. Must run without ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sass_census  # noqa: E402  (beside this script, which runs as a file)

#: Shared memory a block may use on Hopper (H100/H200: 227 KiB).
MAX_SHARED_BYTES = {90: 232448}

LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


class Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.kernel, args, kwargs))


def install_recorders(modules, calls):
    """Replace the kernels each module launches: its autotuners and its ``@triton.jit`` functions
    named ``*_kernel``, not the ``@triton.jit`` helpers (defined there or imported) that its kernels
    call and that must stay what they are."""
    for module in modules:
        for name, value in list(vars(module).items()):
            fn = value.fn if isinstance(value, Autotuner) else value
            launched = isinstance(value, Autotuner) or (isinstance(value, JITFunction) and name.endswith("_kernel"))
            if launched and fn.__module__ == module.__name__:
                setattr(module, name, Recorder(value, calls))
            elif isinstance(value, dict) and value and all(isinstance(v, Autotuner) for v in value.values()):
                setattr(module, name, {k: Recorder(v, calls) for k, v in value.items()})


def config_launch(config):
    """(constexpr kwargs, launch options) of one autotuning configuration, as the autotuner passes
    them to the JIT: ``all_kwargs()`` where the installed Triton has it, else its fields (looked up
    by name, not by version: ``maxnreg`` and ``num_ctas`` are not in every release)."""
    if hasattr(config, "all_kwargs"):
        merged = dict(config.all_kwargs())
    else:
        merged = dict(config.kwargs)
        for name in LAUNCH_OPTIONS:
            if getattr(config, name, None) is not None:
                merged[name] = getattr(config, name)
    merged.pop("ir_override", None)  # replaces the source itself; no config of the package sets it
    options = {k: merged.pop(k) for k in LAUNCH_OPTIONS if k in merged}
    return merged, options


def compiles_of(kernel, args, kwargs, target):
    """What the JIT compiles for one recorded launch, one per autotune configuration:
    (function, signature, constexprs, attrs, options).

    Triton's own binder types the arguments and specialises them, exactly as ``JITFunction.run``
    does: an int equal to 1 becomes a constexpr, and pointers aligned to 16 bytes and ints divisible
    by 16 get ``tt.divisibility=16``. Those attributes let the compiler vectorise loads and issue
    cp.async; without them it compiles a different, slower kernel with less shared memory.
    """
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    configs = kernel.configs if isinstance(kernel, Autotuner) else [None]
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    for config in configs:
        launch_kwargs = dict(kwargs)
        if config is not None:
            constants, options = config_launch(config)
            launch_kwargs.update(constants)
            launch_kwargs.update(options)
        launch_kwargs.setdefault("debug", False)  # JITFunction.run's default off a debug build
        bound_args, specialization, binder_options = binder(*args, **launch_kwargs)
        opts, signature, constexprs, attrs = fn._pack_args(backend, launch_kwargs, bound_args, specialization,
                                                           binder_options)
        options = {k: getattr(opts, k) for k in LAUNCH_OPTIONS if getattr(opts, k, None) is not None}
        yield fn, signature, constexprs, attrs, options


def _named(fn, paths):
    """``{argument name: value}`` of a Triton path-keyed dict (paths are tuples of argument indices)."""
    names = list(fn.arg_names)
    out = {}
    for path, value in paths.items():
        path = path if isinstance(path, tuple) else (path,)
        out[".".join([names[path[0]]] + [str(i) for i in path[1:]])] = value
    return out


def label(fn, signature, constexprs, options):
    """(dtype, config) for the summary table. dtype: the features' element type, i.e. the narrowest
    float among the pointers (scales, values and gradients stay float32 beside half features).
    config: block sizes, the flags that are on, the unit strides (the layout) and launch options."""
    floats = {t[1:] for t in signature.values() if isinstance(t, str) and t.startswith("*")}
    dtype = next((t for t in ("bf16", "fp16", "fp64", "fp32") if t in floats), "-")
    parts = [f"{k.replace('BLOCK_', '')}{v}" for k, v in constexprs.items() if k.startswith("BLOCK_")]
    flags = [k.lower().replace("has_", "") for k, v in constexprs.items() if v is True and k not in ("IS_F64",)]
    if flags:
        parts.append(",".join(flags))
    unit = [k for k, v in constexprs.items() if v == 1 and not isinstance(v, bool) and not k.startswith("BLOCK_")]
    if unit:
        parts.append("1=" + ",".join(unit))
    if dtype == "fp32" and "PRECISION" in constexprs:
        parts.append(str(constexprs["PRECISION"]))
    parts.append(f"w{options.get('num_warps')}s{options.get('num_stages')}")
    if options.get("maxnreg"):
        parts.append(f"r{options['maxnreg']}")
    return dtype, " ".join(parts)


def record_launches():
    """Every kernel launch of the launchers, over the dtypes, masks, sizes and paths they take."""
    import salign_kernels as sk
    from salign_kernels.ops.triton import _loss, backward, dense, prepare, window

    calls = []
    install_recorders([dense, window, backward, prepare, _loss], calls)
    gen = torch.Generator().manual_seed(0)

    def inputs(dtype, N, C, layout="voxel"):
        """Voxel-major features (B, N, C): contiguous (channel stride 1), or the view of a
        contiguous (B, C, N) map (voxel stride 1), each specialised by Triton into its own compile."""
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        if layout == "voxel":
            xa, xb = (torch.randn(2, N, C, generator=gen).to(dtype) for _ in range(2))
        else:
            xa, xb = (torch.randn(2, C, N, generator=gen).to(dtype).permute(0, 2, 1) for _ in range(2))
        scales = [torch.ones(2, N, dtype=acc) for _ in range(2)]
        mask = torch.ones(2, N, dtype=torch.bool)
        return xa, xb, scales, mask

    def backward_launches(xa, xb, acc):
        """Both backward paths (atomic, deterministic), of the matches and of the fused loss."""
        B, N, _ = xa.shape
        indices = torch.zeros(B, N, dtype=torch.int64)
        grad = torch.ones(B, N, dtype=acc)
        loss_grad = backward.LossGradient(torch.ones((), dtype=acc), torch.ones((), dtype=torch.int64),
                                          grad, True, True)
        factors = torch.ones(3, B, N, dtype=acc)
        prepared = [backward.Prepared(x, x, *factors) for x in (xa, xb)]
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            backward.match_backward(grad, xa, xb, indices, True, torch.empty_like(xa), torch.empty_like(xb))
            backward.loss_backward([loss_grad, loss_grad], *prepared, [indices, indices],
                                   torch.empty_like(xa), torch.empty_like(xb))
        torch.use_deterministic_algorithms(False)

    # Every dtype through the fixed-tile paths (small maps; channels in one chunk and in several),
    # the windows (2D and 3D) and both backward paths.
    for dtype in [torch.float32, torch.bfloat16, torch.float16, torch.float64]:
        for N, C, masked, layout in [(63, 24, False, "voxel"), (63, 24, True, "voxel"),
                                     (63, 200, True, "voxel"), (63, 24, True, "channel")]:
            xa, xb, (sa, sb), mask = inputs(dtype, N, C, layout)
            masks = (mask, mask) if masked else (None, None)
            for normalize in (True, False):
                prepare.forward_rows(xa, normalize)
                prepare.backward_factors(xa, normalize, rows=True)
                prepare.prepare_pair(xa, xb, normalize, normalize, normalize)
            dense.dense_match_forward(xa, xb, sa, sb, *masks)
            dense.dense_match_symmetric_forward(xa, xb, sa, sb, *masks)
            # The fused loss: the scans' partial sums, the finishing program.
            acc = sa.dtype
            sums, counts = _loss.partial_buffers(2, dense.loss_slots(N, 2, dtype), acc, xa.device)
            dense.dense_match_forward(xa, xb, sa, sb, *masks, partials=(sums[0], counts[0]))
            for mean in (True, False):
                _loss.finish_loss(sums, counts, mean)
                _loss.finish_loss(sums[:1], counts[:1], mean)
            if masked:
                for spatial, k, mode in [((9, 7), (7, 7), 0), ((9, 7), (3, 3), 1), ((9, 7), (9, 9), 1),
                                         ((3, 3, 7), (3, 3, 3), 0), ((3, 3, 7), (2, 3, 4), 1)]:
                    window.window_match_forward(xa, xb, sa, sb, mask, mask, spatial, k, mode)
                    slots = window.loss_slots(spatial, 2, dtype)
                    sums, counts = _loss.partial_buffers(1, slots, sa.dtype, xa.device)
                    window.window_match_forward(xa, xb, sa, sb, mask, mask, spatial, k, mode,
                                                partials=(sums[0], counts[0]))
                backward_launches(xa, xb, sa.dtype)
        # The canonical channel count: one chunk of 128 channels, the largest gather tile.
        xa, xb, (sa, _), _ = inputs(dtype, 63, 128)
        backward_launches(xa, xb, sa.dtype)
    # Every autotuning configuration of the large-map path, for the tensor-core dtype and float32
    # (float16 compiles as bfloat16 does), and for float32 with three TF32 products per tile.
    # Voxel-major rows only: the ops hand the scans the rows of prepare_features.
    for dtype, precision in [(torch.bfloat16, "tf32x3"), (torch.float32, "ieee"), (torch.float32, "tf32x3")]:
        previous = sk.set_float32_precision(precision)
        try:
            xa, xb, (sa, sb), mask = inputs(dtype, 64 * 64, 128)
            dense.dense_match_forward(xa, xb, sa, sb, None, None)
            dense.dense_match_forward(xa, xb, sa, sb, mask, mask)
            dense.dense_match_symmetric_forward(xa, xb, sa, sb, mask, mask)
        finally:
            sk.set_float32_precision(previous)
    return calls


def compile_one(fn, signature, constexprs, attrs, options, target, limit):
    """Compile one launch and read its cubin: the JSON record of it."""
    named = _named(fn, constexprs)
    dtype, config = label(fn, signature, named, options)
    record = dict(kernel=fn.__name__, dtype=dtype, config=config, signature=signature, constexprs=named,
                  attrs={str(k): v for k, v in _named(fn, attrs).items()}, options=options)
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
    except Exception as exc:  # a compile error is the finding: report every one
        record["ok"] = False
        record["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()[-2000:]
        return record
    record["shared_bytes"] = compiled.metadata.shared
    record["ok"] = limit is None or compiled.metadata.shared <= limit
    if not record["ok"]:
        record["error"] = f"needs {compiled.metadata.shared} bytes of shared memory; {limit} fit"
    try:  # the cubin in memory, disassembled: no second compile
        record["census"] = sass_census.census_of_compiled(compiled)
    except Exception as exc:  # a missing cuobjdump must not hide the compile results
        record["census_error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()[-500:]
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--only", metavar="SUBSTRING", help="compile only the kernels whose name contains it")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    limit = MAX_SHARED_BYTES.get(args.arch)
    seen, failures, count, records = {}, 0, 0, []  # seen: compile key -> whether it fitted
    for kernel, launch_args, kwargs in record_launches():
        name = (kernel.fn if isinstance(kernel, Autotuner) else kernel).__name__
        if args.only and args.only not in name:
            continue
        # An autotuned launch needs one configuration that compiles and fits: the autotuner skips
        # the others (as out of resources). A plain launch must compile and fit as it is.
        autotuned = isinstance(kernel, Autotuner)
        usable = 0
        launch_records = []
        for fn, signature, constexprs, attrs, options in compiles_of(kernel, launch_args, kwargs, target):
            key = json.dumps([fn.__name__, signature, _named(fn, constexprs), {str(k): v for k, v in attrs.items()},
                              options, autotuned], sort_keys=True, default=str)
            if key in seen:  # the same compile from another launch: reported (and counted) there
                usable += seen[key]
                continue
            record = compile_one(fn, signature, constexprs, attrs, options, target, limit)
            record["autotuned"] = autotuned
            seen[key] = record["ok"]
            usable += record["ok"]
            count += 1
            launch_records.append(record)
        for record in launch_records:
            if autotuned and not record["ok"] and usable:
                record["skipped_by_autotuner"] = True
            elif not record["ok"]:
                failures += 1
            records.append(record)
            print(json.dumps(record, default=str), flush=True)
    print(sass_census.table(records), file=sys.stderr)
    print(json.dumps({"summary": True, "compiled": count, "failed": failures, "arch": args.arch,
                      "triton": triton.__version__, "table": sass_census.table(records).splitlines()}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
