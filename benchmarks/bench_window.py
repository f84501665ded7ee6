"""Windowed (WLA) loss on the CPU: the reference (unfold / per-tile bmm) and the C++ backend."""

import pytest

from benchmarks.harness import run_case
from benchmarks.providers import CPU_WINDOW_SHAPE, CPU_WINDOWS, Case


@pytest.mark.parametrize("mode", ["forward", "backward", "full"])
@pytest.mark.parametrize("provider", ["reference", "cpp"])
@pytest.mark.parametrize("window,window_mode", CPU_WINDOWS)
def bench_window(benchmark, window, window_mode, provider, mode):
    case = Case(CPU_WINDOW_SHAPE, window, window_mode)
    run_case(benchmark, provider, case, mode, group=f"{window_mode} k={window} {mode}")
