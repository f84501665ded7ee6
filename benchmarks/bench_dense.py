"""Dense LA loss on the CPU: reference, chunked reference and the C++ backend, at S, M and L, and on
sub-volumes."""

import pytest
import torch

from benchmarks.harness import machine, run_case
from benchmarks.providers import CPU_DENSE_3D_SHAPE, CPU_DENSE_SHAPES, MM_SHAPE, Case

MODES = ["forward", "backward", "full"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["reference", "reference_chunked", "cpp"])
@pytest.mark.parametrize("size", list(CPU_DENSE_SHAPES))
def bench_dense(benchmark, size, provider, mode):
    run_case(benchmark, provider, Case(CPU_DENSE_SHAPES[size]), mode, group=f"dense {size} {mode}", size=size)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["reference", "reference_chunked", "cpp"])
def bench_dense_3d(benchmark, provider, mode):
    """Dense matching of sub-volumes on the flat voxel axis: N = D * H * W candidates per query."""
    case = Case(CPU_DENSE_3D_SHAPE)
    run_case(benchmark, provider, case, mode, group=f"{case.label} {mode}")


@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("provider", ["cpp", "cpp_two_pass", "reference"])
def bench_dense_symmetric(benchmark, provider, mode):
    """Both directions from one pass (cpp) against two one-way passes (cpp_two_pass)."""
    case = Case(CPU_DENSE_SHAPES["M"], symmetric=True)
    run_case(benchmark, provider, case, mode, group=f"dense M symmetric {mode}", size="M", measure_memory=False)


def bench_mm(benchmark):
    """torch.mm on 4096x512 @ 512x4096: the matrix-multiply throughput of this machine, same run."""
    m, k, n = MM_SHAPE
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=generator), torch.randn(k, n, generator=generator)
    torch.mm(a, b)
    benchmark.group = "mm"
    benchmark.extra_info.update(provider="torch.mm", mode="forward", case="mm", shape=[m, k, n],
                                gflop=2 * m * k * n / 1e9, device=machine(), threads=torch.get_num_threads())
    benchmark.pedantic(torch.mm, args=(a, b), rounds=20, iterations=1, warmup_rounds=2)
