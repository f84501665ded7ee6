"""Helpers shared by the test modules: seeded features and masks, memory layouts."""

from __future__ import annotations

import torch


def make_features(shape, dtype=torch.float32, seed=0, device="cpu"):
    """Two random feature maps ``(B, C, *spatial)`` (2D or 3D) from a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=generator, dtype=torch.float64)
    b = torch.randn(shape, generator=generator, dtype=torch.float64)
    return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


def make_mask(shape, keep=0.7, seed=1, device="cpu"):
    """A random bool mask ``(B, *spatial)`` keeping about ``keep`` of the voxels of features of ``shape``."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape[0], *shape[2:], generator=generator) < keep).to(device)


def as_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout: contiguous, channels-last (channels_last_3d for a
    volume) or a strided view."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        format = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=format)
    if layout == "strided":  # every other column of a map twice as wide: not contiguous
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        view = wide[..., ::2]
        assert not view.is_contiguous()
        return view
    raise ValueError(layout)


# Per-dtype tolerances of a compiled backend against the reference: (atol, rtol). Values and losses
# accumulate in float32 in both, so they agree closely for every input dtype; gradients come back in
# the input's dtype and differ by its rounding.
VALUE_TOLERANCE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-5, 2e-5),
    torch.bfloat16: (2e-5, 2e-5),
}
GRAD_TOLERANCE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def cpu_backends():
    """The compiled backends that can run on CPU tensors in this process."""
    import salign_kernels as sk

    names = []
    for name in ("cpp", "triton"):
        try:
            sk.resolve_backend(name, "cpu")
        except sk.BackendUnavailableError:
            continue
        names.append(name)
    return names


def similarity(feat_a, feat_b, p_index, q_index, normalize=True):
    """``s(p, q)`` in float64 for matching (B, N) flat index tensors p and q (q >= 0)."""
    from salign_kernels import reference

    xa = reference.prepare_features(feat_a.double(), normalize).flatten(2)
    xb = reference.prepare_features(feat_b.double(), normalize).flatten(2)
    B, C, _ = xa.shape
    pa = torch.gather(xa, 2, p_index[:, None].expand(B, C, -1))
    qb = torch.gather(xb, 2, q_index.clamp_min(0)[:, None].expand(B, C, -1))
    return (pa * qb).sum(1)


def values_at(feat_a, feat_b, indices, normalize=True):
    """``s(p, indices[p])`` by plain PyTorch (0 where ``indices[p] < 0``), differentiable: the values
    of a matching that chose ``indices``. Its gradient is the one a kernel must give for its own
    choice, also where a near-tie made that choice differ from the reference's."""
    from salign_kernels import reference

    xa = reference.prepare_features(feat_a, normalize).flatten(2)
    xb = reference.prepare_features(feat_b, normalize).flatten(2)
    B, C, _ = xa.shape
    q = indices.flatten(1)
    picked = torch.gather(xb, 2, q.clamp_min(0)[:, None].expand(B, C, -1))
    return ((xa * picked).sum(1) * (q >= 0)).view(indices.shape)


def assert_same_matches(got, want, feat_a, feat_b, normalize=True, atol=2e-5):
    """The matches agree: same valid queries, same values, and equal indices except at near-ties.

    Where the indices differ, the candidate chosen must be as similar (in float64) as the
    reference's choice, within ``atol``: rounding may break a near-tie the other way.
    """
    (got_values, got_indices), (want_values, want_indices) = got, want
    assert got_indices.dtype == torch.int64 and got_indices.shape == want_indices.shape
    assert torch.equal(got_indices < 0, want_indices < 0), "different queries are valid"
    differ = got_indices != want_indices
    if differ.any():
        B = feat_a.shape[0]
        p = torch.arange(got_indices[0].numel()).expand(B, -1)
        s_got = similarity(feat_a, feat_b, p, got_indices.flatten(1), normalize)
        s_want = similarity(feat_a, feat_b, p, want_indices.flatten(1), normalize)
        gap = (s_want - s_got).abs()[differ.flatten(1)]
        assert gap.max() <= atol, f"{int(differ.sum())} indices differ, similarity gap up to {gap.max():.3g}"
    torch.testing.assert_close(got_values, want_values, atol=atol, rtol=atol, equal_nan=True)
