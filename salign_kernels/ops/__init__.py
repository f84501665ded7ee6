"""Compiled backends: ``cpu`` (the C++ extension) and ``triton`` (GPU kernels), loaded lazily by ``_backend``."""
