"""Benchmarks of salign_kernels: ``make bench`` (CPU) and ``make gpu-check`` (GPU)."""
