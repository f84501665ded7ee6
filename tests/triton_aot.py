"""Compile every Triton kernel launch of the package for an NVIDIA GPU, on a machine without one.

    python tests/triton_aot.py [--arch 90]

Triton's interpreter runs the kernels' Python but never their compiler, which rejects things the
interpreter accepts (a global that is not ``tl.constexpr``, a ``tl.dot`` of mismatched dtypes, a
tile that overflows shared memory). Here the launchers run on CPU tensors with each kernel replaced
by a recorder, and every recorded launch (each autotuning configuration too) is compiled by
Triton's own NVIDIA pipeline, down to a cubin for the chosen architecture: what the first call on a
GPU would do. Prints one JSON object per distinct compile, then a summary line; exits 1 on any
failure. Must run without ``TRITON_INTERPRET=1``.
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
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

#: Shared memory a block may use on Hopper (H100/H200: 227 KiB).
MAX_SHARED_BYTES = {90: 232448}

TRITON_TYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "i1",
}
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


def compiles_of(kernel, args, kwargs):
    """(function, signature, constexprs, options) for one recorded launch; one per autotune config."""
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    configs = kernel.configs if isinstance(kernel, Autotuner) else [None]
    bound = dict(zip(fn.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
    base_options = {k: v for k, v in kwargs.items() if k in LAUNCH_OPTIONS}
    for config in configs:
        values = dict(bound)
        options = dict(base_options)
        if config is not None:
            values.update(config.kwargs)
            options.update(num_warps=config.num_warps, num_stages=config.num_stages)
        signature, constexprs = {}, {}
        for param, name in zip(fn.params, fn.arg_names):
            value = values[name]
            if param.is_constexpr:
                signature[name] = "constexpr"
                constexprs[name] = value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + TRITON_TYPES[value.dtype]
            elif isinstance(value, bool):
                signature[name] = "i1"
            elif isinstance(value, int) and value == 1 and not param.do_not_specialize:
                signature[name] = "constexpr"  # as the launcher does: an int equal to 1 is specialised
                constexprs[name] = 1
            elif isinstance(value, int):
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            elif isinstance(value, float):
                signature[name] = "fp32"
            else:
                raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
        yield fn, signature, constexprs, options


def record_launches():
    """Every kernel launch of the launchers, over the dtypes, masks, sizes and paths they take."""
    import salign_kernels as sk
    from salign_kernels.ops.triton import backward, dense, prepare, window

    calls = []
    install_recorders([dense, window, backward, prepare], calls)
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
            dense.dense_match_forward(xa, xb, sa, sb, *masks)
            dense.dense_match_symmetric_forward(xa, xb, sa, sb, *masks)
            if masked:
                for spatial, k, mode in [((9, 7), (7, 7), 0), ((9, 7), (3, 3), 1), ((9, 7), (9, 9), 1),
                                         ((3, 3, 7), (3, 3, 3), 0), ((3, 3, 7), (2, 3, 4), 1)]:
                    window.window_match_forward(xa, xb, sa, sb, mask, mask, spatial, k, mode)
                indices = torch.zeros(2, N, dtype=torch.int64)
                grad = torch.ones(2, N, dtype=sa.dtype)
                for deterministic in (False, True):
                    torch.use_deterministic_algorithms(deterministic)
                    backward.match_backward(grad, xa, xb, indices, True, torch.empty_like(xa), torch.empty_like(xb))
                torch.use_deterministic_algorithms(False)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    limit = MAX_SHARED_BYTES.get(args.arch)
    seen, failures, count = set(), 0, 0
    for kernel, launch_args, kwargs in record_launches():
        # An autotuned launch needs one configuration that compiles and fits: the autotuner skips
        # the others (as out of resources). A plain launch must compile and fit as it is.
        autotuned = isinstance(kernel, Autotuner)
        usable = 0
        launch_records = []
        for fn, signature, constexprs, options in compiles_of(kernel, launch_args, kwargs):
            record = dict(kernel=fn.__name__, signature=signature, constexprs=constexprs, options=options,
                          autotuned=autotuned)
            key = json.dumps(record, sort_keys=True, default=str)
            try:
                compiled = triton.compile(ASTSource(fn, signature, constexprs), target=target, options=options)
                record["shared_bytes"] = compiled.metadata.shared
                record["ok"] = limit is None or compiled.metadata.shared <= limit
                if not record["ok"]:
                    record["error"] = f"needs {compiled.metadata.shared} bytes of shared memory; {limit} fit"
            except Exception as exc:  # a compile error is the finding: report every one
                record["ok"] = False
                record["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()[-2000:]
            usable += record["ok"]
            if key not in seen:
                seen.add(key)
                count += 1
                launch_records.append(record)
        for record in launch_records:
            if autotuned and not record["ok"] and usable:
                record["skipped_by_autotuner"] = True
            elif not record["ok"]:
                failures += 1
            print(json.dumps(record, default=str), flush=True)
    print(json.dumps({"summary": True, "compiled": count, "failed": failures, "arch": args.arch,
                      "triton": triton.__version__}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
