"""Where the GPU time of one training step goes: a kernel-by-kernel profile, and the dense forward's
ceilings.

    PYTHONPATH=. python3 benchmarks/profile_gpu.py [--out dir]

Two parts, printed and written to ``dir/profile.txt``:

1. ``torch.profiler`` over a few forward + backward steps of the Triton backend's loss for the GPU
   benchmark cases (dense bf16 / fp32 / fp32 as 3xTF32, sliding k = 7, dense symmetric): the device
   time of every kernel, the matching kernels and PyTorch's own (layout copies, norms, the loss).
2. The dense similarity scan with simpler epilogues, at the benchmark's shape in bfloat16: the
   product alone followed by a row max (no argmax: the ceiling of any epilogue), and with a
   lowest-index argmax that ignores NaN; against the library's kernel on the same inputs. The
   difference is what the exact (max, argmax) costs per tile.
"""

from __future__ import annotations

import argparse
import io
import os
import sys

import torch
import triton
import triton.language as tl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.providers import GPU_DENSE_SHAPE, Case, loss_function, make_inputs  # noqa: E402

PROFILED = [
    ("dense bf16", Case(GPU_DENSE_SHAPE, None, "sliding", False, torch.bfloat16), "triton"),
    ("dense fp32", Case(GPU_DENSE_SHAPE, None, "sliding", False, torch.float32), "triton"),
    ("sliding7 bf16", Case(GPU_DENSE_SHAPE, 7, "sliding", False, torch.bfloat16), "triton"),
    ("sliding7 fp32", Case(GPU_DENSE_SHAPE, 7, "sliding", False, torch.float32), "triton"),
    ("symmetric bf16", Case(GPU_DENSE_SHAPE, None, "sliding", True, torch.bfloat16), "triton"),
]


def profile_steps(out):
    from torch.profiler import ProfilerActivity, profile

    for name, case, provider in PROFILED:
        fn = loss_function(provider, case)
        a, b = make_inputs(case, device="cuda")
        for _ in range(3):
            a.grad = b.grad = None
            fn(a, b).backward()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                a.grad = b.grad = None
                fn(a, b).backward()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60)
        print(f"\n=== {name} ({provider}), 3 steps ===\n{table}", file=out)


@triton.jit
def _scan_kernel(xa_ptr, xb_ptr, out_ptr, idx_ptr, N, C: tl.constexpr, EPILOGUE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # EPILOGUE 0: row max only; 1: row max and the lowest index at it (no NaN handling).
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.arange(0, C)
    a = tl.load(xa_ptr + (batch * N + rows.to(tl.int64))[:, None] * C + ks[None, :])
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK_M], 0, tl.int32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        bt = tl.load(xb_ptr + (batch * N + cols.to(tl.int64))[:, None] * C + ks[None, :])
        s = tl.dot(a, tl.trans(bt))
        top = tl.max(s, 1)
        if EPILOGUE == 1:
            arg = tl.min(tl.where(s == top[:, None], cols[None, :], 2**31 - 1), 1)
            better = top > best
            best_idx = tl.where(better, arg, best_idx)
        best = tl.maximum(best, top)
    tl.store(out_ptr + batch * N + rows, best)
    tl.store(idx_ptr + batch * N + rows, best_idx)


def scan_ceilings(out):
    from triton.testing import do_bench

    from salign_kernels.ops.triton import dense
    from salign_kernels.ops.triton._runtime import voxel_major
    from salign_kernels.ops.triton.prepare import forward_rows

    B, C, H, W = GPU_DENSE_SHAPE
    N = H * W
    flops = 2 * B * N * N * C
    a, b = make_inputs(Case(GPU_DENSE_SHAPE, None, "sliding", False, torch.bfloat16), device="cuda",
                       requires_grad=False)
    xa, xb = voxel_major(a), voxel_major(b)  # views of the (B, C, H, W) maps: voxel stride 1
    sa, sb = forward_rows(xa, True)[1], forward_rows(xb, True)[1]  # ordinary features: rows = maps
    best = torch.empty(B, N, device="cuda")
    idx = torch.empty(B, N, device="cuda", dtype=torch.int32)
    print(f"\n=== dense scan {GPU_DENSE_SHAPE} bf16: TFLOP/s of the similarities ===", file=out)
    for layout, (x, y) in (("(B, C, H, W) maps", (xa, xb)), ("pixel-major copies", (xa.contiguous(), xb.contiguous()))):
        ms = do_bench(lambda: dense.dense_match_forward(x, y, sa, sb, None, None), return_mode="median")
        print(f"library kernel on {layout}: {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s", file=out)
    xa, xb = xa.contiguous(), xb.contiguous()
    for epilogue in (0, 1):
        for block_m, block_n, warps, stages in ((128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2),
                                                (64, 128, 4, 3), (128, 64, 8, 4), (256, 64, 8, 3)):
            grid = (N // block_m, B)

            def run():
                _scan_kernel[grid](xa, xb, best, idx, N, C=C, EPILOGUE=epilogue, BLOCK_M=block_m,
                                   BLOCK_N=block_n, num_warps=warps, num_stages=stages)

            try:
                ms = do_bench(run, return_mode="median")
            except Exception as exc:  # a config that does not fit: say so, go on
                print(f"epilogue {epilogue} {block_m}x{block_n} w{warps} s{stages}: {type(exc).__name__}", file=out)
                continue
            print(f"epilogue {epilogue} ({'max' if epilogue == 0 else 'max+argmax'}) {block_m}x{block_n} "
                  f"w{warps} s{stages}: {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s", file=out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    buffer = io.StringIO()
    for part in (scan_ceilings, profile_steps):
        try:
            part(buffer)
        except Exception as exc:  # keep the other part's numbers
            print(f"{part.__name__} failed: {type(exc).__name__}: {exc}", file=buffer)
        print(buffer.getvalue()[-200:], flush=True)
    text = buffer.getvalue()
    with open(os.path.join(args.out, "profile.txt"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
