"""Windowed (WLA) loss on the CPU: the reference (unfold / per-tile bmm) and the C++ backend, on
slices (B, C, H, W) and volumes (B, C, D, H, W)."""

import pytest

from benchmarks.harness import run_case
from benchmarks.providers import CPU_WINDOW_3D_SHAPE, CPU_WINDOW_SHAPE, CPU_WINDOWS, CPU_WINDOWS_3D, Case

MODES = ["forward", "backward", "full"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["reference", "cpp"])
@pytest.mark.parametrize("window,window_mode", CPU_WINDOWS)
def bench_window(benchmark, window, window_mode, provider, mode):
    case = Case(CPU_WINDOW_SHAPE, window, window_mode)
    run_case(benchmark, provider, case, mode, group=f"{case.label} {mode}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["reference", "cpp"])
@pytest.mark.parametrize("window,window_mode", CPU_WINDOWS_3D)
def bench_window_3d(benchmark, window, window_mode, provider, mode):
    case = Case(CPU_WINDOW_3D_SHAPE, window, window_mode)
    run_case(benchmark, provider, case, mode, group=f"{case.label} {mode}")
