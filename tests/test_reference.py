"""The reference against answers computed by hand and against the specification's loops."""

from __future__ import annotations

import pytest
import torch

from salign_kernels import reference
from spec_oracle import spec_match
from helpers import as_layout, make_features, make_mask


def pixels(rows):
    """``(1, C, H, W)`` float64 features from nested lists ``rows[h][w] = [c0, c1, ...]``."""
    return torch.tensor(rows, dtype=torch.float64).permute(2, 0, 1).unsqueeze(0)


def scalar_map(rows):
    """``(1, 1, H, W)`` one-channel features from a 2-D list."""
    return torch.tensor(rows, dtype=torch.float64)[None, None]


# --- dense matching, by hand ---------------------------------------------------------------------


def test_dense_raw_dot_products_by_hand():
    a = pixels([[[1, 0], [0, 1], [1, 1]]])
    b = pixels([[[2, 0], [0, 3], [1, 1]]])
    # a0: [2, 0, 1] -> 2 at 0; a1: [0, 3, 1] -> 3 at 1; a2: [2, 3, 2] -> 3 at 1
    values, indices = reference.dense_match(a, b, normalize=False)
    assert indices.tolist() == [[[0, 1, 1]]]
    assert values.tolist() == [[[2.0, 3.0, 3.0]]]
    loss = reference.local_alignment_loss(a, b, normalize=False)
    assert loss.item() == pytest.approx((1 + 2 + 2) / 3)


def test_dense_cosines_by_hand():
    a = pixels([[[3, 4]]])  # (0.6, 0.8)
    b = pixels([[[0, 5], [4, 3]]])  # (0, 1), (0.8, 0.6): cosines 0.8 and 0.96
    values, indices = reference.dense_match(a, b)
    assert indices.tolist() == [[[1]]]
    assert values.item() == pytest.approx(0.96)
    assert reference.local_alignment_loss(a, b).item() == pytest.approx(0.04)


def test_ties_pick_the_lowest_index():
    a = pixels([[[1, 0], [1, 0]]])
    b = pixels([[[0, 1], [1, 0], [2, 0], [1, 0]]])  # cosines 0, 1, 1, 1
    _, indices = reference.dense_match(a, b)
    assert indices.tolist() == [[[1, 1]]]
    _, raw = reference.dense_match(a, b, normalize=False)  # raw dots 0, 1, 2, 1
    assert raw.tolist() == [[[2, 2]]]


def test_loss_is_absolute_distance_to_one():
    # Raw dot products above 1 still cost |1 - value|.
    a, b = scalar_map([[2.0]]), scalar_map([[3.0]])
    assert reference.local_alignment_loss(a, b, normalize=False).item() == 5.0


# --- windows, by hand ----------------------------------------------------------------------------

GRID = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]  # one channel; with a == 1, s(p, q) = b[q]


def test_sliding_window_picks_the_largest_neighbour_and_skips_outside():
    a, b = scalar_map([[1] * 3] * 3), scalar_map(GRID)
    values, indices = reference.window_match(a, b, 3, "sliding", normalize=False)
    # The bottom-right of each 3x3 neighbourhood clipped to the map.
    expected = [[min(h + 1, 2) * 3 + min(w + 1, 2) for w in range(3)] for h in range(3)]
    assert indices[0].tolist() == expected
    assert values[0].tolist() == [[GRID[q // 3][q % 3] for q in row] for row in expected]


def test_sliding_window_smallest_neighbour_at_borders():
    # With a == -1 the best candidate is the smallest b: the top-left of the clipped window.
    a, b = scalar_map([[-1] * 3] * 3), scalar_map(GRID)
    _, indices = reference.window_match(a, b, 3, "sliding", normalize=False)
    assert indices[0].tolist() == [[max(h - 1, 0) * 3 + max(w - 1, 0) for w in range(3)] for h in range(3)]


def test_window_of_one_matches_the_same_pixel():
    a, b = make_features((2, 4, 3, 5), torch.float64)
    for mode in ("sliding", "partition"):
        values, indices = reference.window_match(a, b, 1, mode)
        assert indices.flatten(1).tolist() == [list(range(15))] * 2
        torch.testing.assert_close(values, torch.nn.functional.cosine_similarity(a, b, dim=1))


def test_partition_windows_have_ragged_edges():
    a, b = scalar_map([[1] * 3] * 3), scalar_map(GRID)
    _, indices = reference.window_match(a, b, 2, "partition", normalize=False)
    # Tiles {0,1,3,4} -> 4, {2,5} -> 5, {6,7} -> 7, {8} -> 8.
    assert indices[0].tolist() == [[4, 4, 5], [4, 4, 5], [7, 7, 8]]


def test_partition_tile_never_reaches_into_the_next_tile():
    # The best candidate overall (9 at the far corner) is outside every tile but the last.
    a, b = scalar_map([[1] * 4] * 4), scalar_map([[0, 0, 0, 0]] * 3 + [[0, 0, 0, 9]])
    _, indices = reference.window_match(a, b, 2, "partition", normalize=False)
    assert indices[0].tolist() == [[0, 0, 2, 2], [0, 0, 2, 2], [8, 8, 15, 15], [8, 8, 15, 15]]


def test_even_partition_window_and_window_as_large_as_the_map():
    a, b = make_features((1, 3, 4, 6), torch.float64)
    dense = reference.dense_match(a, b)
    whole = reference.window_match(a, b, 6, "partition")  # one tile covers the 4 x 6 map
    assert torch.equal(whole[1], dense[1])
    torch.testing.assert_close(whole[0], dense[0])


# --- masks ---------------------------------------------------------------------------------------


def test_masked_candidates_are_never_chosen_and_masked_queries_get_minus_one():
    a = pixels([[[1, 0], [0, 1], [1, 0]]])
    b = pixels([[[1, 0], [0, 1], [1, 1]]])
    mask_a = torch.tensor([[[True, False, True]]])
    mask_b = torch.tensor([[[False, True, True]]])
    values, indices = reference.dense_match(a, b, mask_a, mask_b)
    assert indices.tolist() == [[[2, -1, 2]]]  # a0 and a2 would pick b0, which is masked
    assert values[0, 0, 0].item() == pytest.approx(2**-0.5)
    assert values[0, 0, 1].item() == 0.0


def test_sample_with_every_candidate_masked():
    a, b = make_features((2, 3, 4, 4), torch.float64)
    mask_b = torch.ones(2, 4, 4, dtype=torch.bool)
    mask_b[1] = False
    values, indices = reference.dense_match(a, b, mask_b=mask_b)
    assert (indices[1] == -1).all() and (values[1] == 0).all()
    assert (indices[0] >= 0).all()
    loss = reference.local_alignment_loss(a, b, mask_b=mask_b)
    only_first = reference.local_alignment_loss(a[:1], b[:1])
    torch.testing.assert_close(loss, only_first)


@pytest.mark.parametrize("window,mode", [(None, "sliding"), (3, "sliding"), (2, "partition")])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_nothing_valid_gives_zero_loss_and_zero_gradient(window, mode, reduction):
    a, b = make_features((2, 3, 5, 4), torch.float64)
    a.requires_grad_()
    b.requires_grad_()
    for masks in [dict(mask_a=torch.zeros(2, 5, 4, dtype=torch.bool)), dict(mask_b=torch.zeros(2, 5, 4, dtype=torch.bool))]:
        loss = reference.local_alignment_loss(
            a, b, window, mode, symmetric=True, reduction=reduction, **masks
        )
        assert loss.item() == 0.0
        grad_a, grad_b = torch.autograd.grad(loss, (a, b))
        assert torch.equal(grad_a, torch.zeros_like(a)) and torch.equal(grad_b, torch.zeros_like(b))


def test_window_whose_candidates_are_all_masked():
    # Partition tile {8} holds one candidate; masking it leaves query 8 without any.
    a, b = scalar_map([[1] * 3] * 3), scalar_map(GRID)
    mask_b = torch.ones(1, 3, 3, dtype=torch.bool)
    mask_b[0, 2, 2] = False
    _, indices = reference.window_match(a, b, 2, "partition", mask_b=mask_b, normalize=False)
    assert indices[0].tolist() == [[4, 4, 5], [4, 4, 5], [7, 7, -1]]


# --- against the specification's loops ----------------------------------------------------------

ORACLE_CASES = [
    # (B, C, H, W), window, mode
    ((2, 3, 5, 7), None, "sliding"),
    ((1, 1, 1, 6), None, "sliding"),
    ((2, 4, 5, 7), 3, "sliding"),
    ((2, 2, 6, 5), 5, "sliding"),
    ((1, 3, 1, 7), 3, "sliding"),
    ((1, 3, 7, 1), 5, "sliding"),
    ((2, 3, 7, 5), 7, "sliding"),
    ((2, 3, 5, 7), 2, "partition"),
    ((2, 3, 7, 5), 3, "partition"),
    ((1, 2, 5, 5), 4, "partition"),
    ((1, 2, 1, 7), 3, "partition"),
]


@pytest.mark.parametrize("shape,window,mode", ORACLE_CASES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_reference_matches_the_specification(shape, window, mode, masked, normalize):
    a, b = make_features(shape, torch.float64, seed=sum(shape) + (window or 0))
    masks = dict(mask_a=make_mask(shape, 0.8, 2), mask_b=make_mask(shape, 0.6, 3)) if masked else {}
    values, indices = reference.window_match(a, b, window, mode, normalize=normalize, **masks)
    want_values, want_indices = spec_match(a, b, window, mode, normalize=normalize, **masks)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(values, want_values)


# --- reductions and the symmetric layout ---------------------------------------------------------


def test_reductions_agree_with_each_other():
    shape = (3, 4, 5, 6)
    a, b = make_features(shape, torch.float64)
    mask_a = make_mask(shape)
    none = reference.local_alignment_loss(a, b, mask_a=mask_a, reduction="none")
    assert none.shape == (3, 5, 6)
    assert (none[~mask_a] == 0).all()
    values, _ = reference.dense_match(a, b, mask_a)
    torch.testing.assert_close(none[mask_a], (1 - values[mask_a]).abs())
    total = reference.local_alignment_loss(a, b, mask_a=mask_a, reduction="sum")
    mean = reference.local_alignment_loss(a, b, mask_a=mask_a, reduction="mean")
    torch.testing.assert_close(total, none.sum())
    torch.testing.assert_close(mean, none.sum() / mask_a.sum())


@pytest.mark.parametrize("window,mode", [(None, "sliding"), (3, "sliding"), (3, "partition")])
def test_symmetric_averages_both_directions(window, mode):
    shape = (2, 4, 6, 5)
    a, b = make_features(shape, torch.float64)
    mask_a, mask_b = make_mask(shape, 0.5, 1), make_mask(shape, 0.9, 2)
    kw = dict(window=window, window_mode=mode)
    forward = {r: reference.local_alignment_loss(a, b, mask_a=mask_a, mask_b=mask_b, reduction=r, **kw) for r in ("none", "sum", "mean")}
    backward = {r: reference.local_alignment_loss(b, a, mask_a=mask_b, mask_b=mask_a, reduction=r, **kw) for r in ("none", "sum", "mean")}
    both = {r: reference.local_alignment_loss(a, b, symmetric=True, mask_a=mask_a, mask_b=mask_b, reduction=r, **kw) for r in ("none", "sum", "mean")}
    assert both["none"].shape == (2, 2, 6, 5)
    assert torch.equal(both["none"][:, 0], forward["none"])  # channel 0 is a -> b
    assert torch.equal(both["none"][:, 1], backward["none"])
    torch.testing.assert_close(both["sum"], (forward["sum"] + backward["sum"]) / 2)
    # "mean" averages the per-direction means, whose valid counts differ here.
    torch.testing.assert_close(both["mean"], (forward["mean"] + backward["mean"]) / 2)


# --- gradients -----------------------------------------------------------------------------------


def test_gradient_flows_through_the_chosen_pair_only():
    # normalize=False, values < 1, reduction="sum": d loss / d xa_p = -xb_index[p] and
    # d loss / d xb_q = -sum of xa_p over the p that chose q.
    shape = (2, 3, 4, 5)
    a, b = make_features(shape, torch.float64)
    a, b = (0.1 * a).requires_grad_(), (0.1 * b).requires_grad_()
    loss = reference.local_alignment_loss(a, b, normalize=False, reduction="sum")
    grad_a, grad_b = torch.autograd.grad(loss, (a, b))
    _, indices = reference.dense_match(a, b, normalize=False)
    B, C, H, W = shape
    xa, xb, idx = a.detach().flatten(2), b.detach().flatten(2), indices.flatten(1)
    want_a = -torch.gather(xb, 2, idx[:, None].expand(B, C, H * W))
    want_b = torch.zeros_like(xb).scatter_add_(2, idx[:, None].expand(B, C, H * W), -xa)
    torch.testing.assert_close(grad_a.flatten(2), want_a)
    torch.testing.assert_close(grad_b.flatten(2), want_b)


GRAD_CASES = [(None, "sliding"), (3, "sliding"), (3, "partition"), (2, "partition")]


@pytest.mark.parametrize("window,mode", GRAD_CASES)
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_match_values(window, mode, normalize):
    a, b = make_features((2, 3, 4, 5), torch.float64, seed=7)
    a.requires_grad_()
    b.requires_grad_()
    mask_b = make_mask(a.shape, 0.8, 4)
    assert torch.autograd.gradcheck(
        lambda x, y: reference.window_match(x, y, window, mode, mask_b=mask_b, normalize=normalize)[0], (a, b)
    )


@pytest.mark.parametrize("window,mode", GRAD_CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_symmetric_loss(window, mode, reduction):
    a, b = make_features((2, 3, 4, 5), torch.float64, seed=8)
    a.requires_grad_()
    b.requires_grad_()
    mask_a = make_mask(a.shape, 0.8, 5)
    assert torch.autograd.gradcheck(
        lambda x, y: reference.local_alignment_loss(x, y, window, mode, True, mask_a=mask_a, reduction=reduction),
        (a, b),
    )


def test_gradcheck_positional_loss():
    pred = torch.randn(5, dtype=torch.float64, requires_grad=True)
    pos_a, pos_b = torch.rand(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: reference.global_positional_loss(p, pos_a, pos_b), (pred,))


# --- dtypes, layouts and non-finite input --------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window,mode", [(None, "sliding"), (3, "sliding"), (2, "partition")])
def test_half_inputs_accumulate_in_float32(dtype, window, mode):
    a, b = make_features((2, 8, 5, 6), dtype)
    a.requires_grad_()
    values, indices = reference.window_match(a, b, window, mode)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    want_values, want_indices = reference.window_match(a.detach().float(), b.float(), window, mode)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(values, want_values)
    loss = reference.local_alignment_loss(a, b, window, mode)
    assert loss.dtype == torch.float32
    loss.backward()
    assert a.grad.dtype == dtype


def test_float64_stays_float64():
    a, b = make_features((1, 2, 3, 3), torch.float64)
    assert reference.dense_match(a, b)[0].dtype == torch.float64
    assert reference.local_alignment_loss(a, b).dtype == torch.float64


def test_autocast_does_not_lower_the_precision():
    a, b = make_features((2, 8, 5, 6))
    want = reference.local_alignment_loss(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = reference.local_alignment_loss(a, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("window,mode", [(None, "sliding"), (3, "sliding"), (2, "partition")])
def test_memory_layout_does_not_change_the_answer(layout, window, mode):
    a, b = make_features((2, 5, 4, 6))
    want = reference.window_match(a, b, window, mode)
    got = reference.window_match(as_layout(a, layout), as_layout(b, layout), window, mode)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["a", "b"])
@pytest.mark.parametrize("window,mode", [(None, "sliding"), (3, "sliding"), (2, "partition")])
def test_non_finite_features_give_a_nan_loss(bad, where, window, mode):
    a, b = make_features((1, 3, 4, 4))
    # Every query's window reaches pixel (1, 1) of b; pixel (1, 1) of a is a query.
    (a if where == "a" else b)[0, 0, 1, 1] = bad
    loss = reference.local_alignment_loss(a, b, window, mode, symmetric=True)
    assert torch.isnan(loss)


# --- volumes: (B, C, D, H, W) ---------------------------------------------------------------------


def voxels(volume):
    """``(1, C, D, H, W)`` float64 features from nested lists ``volume[d][h][w] = [c0, c1, ...]``."""
    return torch.tensor(volume, dtype=torch.float64).permute(3, 0, 1, 2).unsqueeze(0)


def test_volume_dense_by_hand():
    # 2 x 1 x 2 voxels, flat index p = (d * H + h) * W + w = 2 * d + w.
    a = voxels([[[[1, 0], [0, 1]]], [[[1, 1], [-1, 0]]]])
    b = voxels([[[[0, 2], [1, 0]]], [[[3, 0], [1, 1]]]])
    # raw dots of a's voxels with b's [0, 2], [1, 0], [3, 0], [1, 1]:
    # a0 [1, 0]: 0, 1, 3, 1 -> 3 at 2;  a1 [0, 1]: 2, 0, 0, 1 -> 2 at 0;
    # a2 [1, 1]: 2, 1, 3, 2 -> 3 at 2;  a3 [-1, 0]: 0, -1, -3, -1 -> 0 at 0
    values, indices = reference.dense_match(a, b, normalize=False)
    assert values.shape == indices.shape == (1, 2, 1, 2)
    assert indices.flatten().tolist() == [2, 0, 2, 0]
    assert values.flatten().tolist() == [3.0, 2.0, 3.0, 0.0]


def test_volume_sliding_window_reaches_the_next_slice_only_within_its_depth():
    # One channel, raw products: b holds its largest value two slices away from query (0, 1, 1).
    a = torch.ones(1, 1, 3, 3, 3, dtype=torch.float64)
    b = torch.zeros(1, 1, 3, 3, 3, dtype=torch.float64)
    b[0, 0, 2, 1, 1] = 5.0  # flat 22
    b[0, 0, 1, 0, 0] = 2.0  # flat 9
    _, indices = reference.window_match(a, b, 3, normalize=False)
    assert indices[0, 0, 1, 1] == 9  # depth 0 +- 1 does not reach depth 2
    assert indices[0, 1, 1, 1] == 22 and indices[0, 2, 2, 2] == 22
    _, in_plane = reference.window_match(a, b, (1, 3, 3), normalize=False)
    assert in_plane[0, 1, 0, 0] == 9 and in_plane[0, 2, 1, 1] == 22 and in_plane[0, 0, 1, 1] == 0


def test_volume_ties_pick_the_lowest_flat_index():
    a = torch.ones(1, 2, 2, 3, 3, dtype=torch.float64)
    b = torch.zeros(1, 2, 2, 3, 3, dtype=torch.float64)
    b[0, 0] = 1.0  # every voxel equally similar to every query
    for window, mode in [(None, "sliding"), (3, "sliding"), ((2, 2, 2), "partition")]:
        _, indices = reference.window_match(a, b, window, mode)
        _, want = spec_match(a, b, window, mode)
        assert torch.equal(indices, want)
    assert (reference.dense_match(a, b)[1] == 0).all()


def test_volume_partition_tiles_from_the_origin_with_ragged_far_edges():
    a = torch.ones(1, 1, 3, 3, 5, dtype=torch.float64)
    b = torch.arange(45, dtype=torch.float64).reshape(1, 1, 3, 3, 5)  # the largest voxel of a tile wins
    _, indices = reference.window_match(a, b, (2, 2, 3), "partition", normalize=False)
    # Tiles along depth {0, 1} {2}, rows {0, 1} {2}, columns {0, 1, 2} {3, 4}: each tile's last voxel.
    assert indices[0, 0, 0, 0] == (1 * 3 + 1) * 5 + 2
    assert indices[0, 2, 2, 4] == 44 and indices[0, 2, 0, 3] == (2 * 3 + 1) * 5 + 4


ORACLE_CASES_3D = [
    # (B, C, D, H, W), window, mode
    ((2, 3, 3, 4, 5), None, "sliding"),
    ((1, 2, 1, 1, 6), None, "sliding"),
    ((2, 3, 3, 4, 5), 3, "sliding"),
    ((1, 2, 4, 3, 5), (1, 3, 3), "sliding"),
    ((1, 2, 5, 2, 3), (5, 1, 3), "sliding"),
    ((2, 3, 3, 4, 5), 2, "partition"),
    ((1, 2, 4, 3, 5), (3, 2, 4), "partition"),
    ((1, 2, 3, 3, 3), 3, "partition"),
]


@pytest.mark.parametrize("shape,window,mode", ORACLE_CASES_3D)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_reference_matches_the_specification_in_3d(shape, window, mode, masked, normalize):
    a, b = make_features(shape, torch.float64, seed=sum(shape))
    masks = dict(mask_a=make_mask(shape, 0.8, 2), mask_b=make_mask(shape, 0.6, 3)) if masked else {}
    values, indices = reference.window_match(a, b, window, mode, normalize=normalize, **masks)
    want_values, want_indices = spec_match(a, b, window, mode, normalize=normalize, **masks)
    assert values.shape == indices.shape == (shape[0], *shape[2:])
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(values, want_values)


@pytest.mark.parametrize("k,mode", [(3, "sliding"), (5, "sliding"), (2, "partition"), (3, "partition")])
def test_in_plane_windows_of_a_volume_are_the_per_slice_result(k, mode):
    # window (1, k, k) on (B, C, D, H, W) is 2D matching of every slice: the same values, and the
    # slice's flat indices offset by d * H * W.
    B, C, D, H, W = 2, 4, 3, 5, 6
    a, b = make_features((B, C, D, H, W), seed=k)
    mask_b = make_mask((B, C, D, H, W), 0.7, 4)
    values, indices = reference.window_match(a, b, (1, k, k), mode, mask_b=mask_b)
    slices = lambda x: x.transpose(1, 2).reshape(B * D, C, H, W)  # noqa: E731
    want_values, want_indices = reference.window_match(slices(a), slices(b), k, mode,
                                                       mask_b=mask_b.reshape(B * D, H, W))
    offset = (torch.arange(D) * H * W).view(1, D, 1, 1)
    want_indices = want_indices.view(B, D, H, W)
    want_indices = torch.where(want_indices >= 0, want_indices + offset, -1)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(values, want_values.view(B, D, H, W), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("window,mode", [(None, "sliding"), ((1, 3, 3), "sliding"), (3, "sliding"), (2, "partition")])
def test_gradcheck_volume(window, mode):
    a, b = make_features((1, 3, 3, 3, 4), torch.float64, seed=11)
    a.requires_grad_()
    b.requires_grad_()
    mask_b = make_mask(a.shape, 0.8, 4)
    assert torch.autograd.gradcheck(
        lambda x, y: reference.local_alignment_loss(x, y, window, mode, True, mask_b=mask_b, reduction="none"), (a, b)
    )


@pytest.mark.parametrize("window,mode", [(None, "sliding"), (3, "sliding"), (2, "partition")])
def test_volume_losses_and_layouts(window, mode):
    shape = (2, 4, 3, 4, 5)
    a, b = make_features(shape)
    mask_a = make_mask(shape, 0.6, 1)
    none = reference.local_alignment_loss(a, b, window, mode, symmetric=True, mask_a=mask_a, reduction="none")
    assert none.shape == (2, 2, 3, 4, 5) and (none[:, 0][~mask_a] == 0).all()
    want = reference.window_match(a, b, window, mode)
    for layout in ("channels_last", "strided"):
        got = reference.window_match(as_layout(a, layout), as_layout(b, layout), window, mode)
        assert torch.equal(got[1], want[1])
        torch.testing.assert_close(got[0], want[0])


def test_everything_masked_in_a_volume():
    a, b = make_features((2, 3, 2, 3, 4))
    empty = torch.zeros(2, 2, 3, 4, dtype=torch.bool)
    for window, mode in [(None, "sliding"), (3, "sliding"), (2, "partition")]:
        values, indices = reference.window_match(a, b, window, mode, mask_b=empty)
        assert (indices == -1).all() and (values == 0).all()
        assert reference.local_alignment_loss(a, b, window, mode, mask_a=empty) == 0
