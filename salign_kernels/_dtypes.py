"""Dtype rules shared by every backend."""

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Similarities, values and losses are float64 for float64 input and float32 otherwise.

    Half and bfloat16 inputs accumulate in float32 so that a cosine near 1 keeps its digits.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32
