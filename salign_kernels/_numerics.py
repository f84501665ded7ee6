"""Numerical rules every backend shares: the supported dtypes, the accumulation dtype, the eps of
the normalisation."""

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

#: ``x / max(||x||, NORMALIZE_EPS)``: the eps of ``torch.nn.functional.normalize``.
NORMALIZE_EPS = 1e-12


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Similarities, values and losses are float64 for float64 input and float32 otherwise.

    Half and bfloat16 inputs accumulate in float32 so that a cosine near 1 keeps its digits.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32
