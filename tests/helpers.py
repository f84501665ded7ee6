"""Helpers shared by the test modules: seeded features and masks, memory layouts."""

from __future__ import annotations

import torch


def make_features(shape, dtype=torch.float32, seed=0, device="cpu"):
    """Two random feature maps ``(B, C, H, W)`` from a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=generator, dtype=torch.float64)
    b = torch.randn(shape, generator=generator, dtype=torch.float64)
    return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


def make_mask(shape, keep=0.7, seed=1, device="cpu"):
    """A random bool mask ``(B, H, W)`` keeping about ``keep`` of the pixels."""
    B, _, H, W = shape
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(B, H, W, generator=generator) < keep).to(device)


def as_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout: contiguous, channels-last or a strided view."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a map twice as wide: not contiguous
        wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        view = wide[..., ::2]
        assert not view.is_contiguous()
        return view
    raise ValueError(layout)
