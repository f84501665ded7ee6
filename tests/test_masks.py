"""feature_mask: image-resolution masks (plain or channel-first) onto the feature grid."""

import pytest
import torch

from salign_kernels import feature_mask


def test_any_pixel_makes_its_cell_foreground_2d():
    mask = torch.zeros(2, 1, 8, 12, dtype=torch.bool)
    mask[0, 0, 5, 1] = True  # cell (1, 0) of a 4x4-pixel grid
    mask[1, 0, 0, 11] = True  # cell (0, 2)
    out = feature_mask(mask, (2, 3))
    expected = torch.zeros(2, 2, 3, dtype=torch.bool)
    expected[0, 1, 0] = True
    expected[1, 0, 2] = True
    assert torch.equal(out, expected)
    assert torch.equal(feature_mask(mask[:, 0], (2, 3)), expected)  # (B, H, W) as well


def test_grid_from_features_and_3d():
    mask = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool)
    mask[0, 0, 3, 0, 2] = True
    feats = torch.randn(1, 5, 2, 2, 2)
    out = feature_mask(mask, feats)
    assert out.shape == (1, 2, 2, 2) and out.sum() == 1 and out[0, 1, 0, 1]


def test_same_grid_is_returned_unchanged_and_all_false_stays_false():
    mask = torch.rand(3, 6, 7) > 0.5
    assert torch.equal(feature_mask(mask, (6, 7)), mask)
    assert not feature_mask(torch.zeros(3, 1, 6, 7, dtype=torch.bool), (3, 3)).any()


@pytest.mark.parametrize(
    "mask, grid, error, words",
    [
        (torch.ones(2, 8, 8), (4, 4), TypeError, "bool"),
        ([[True]], (4, 4), TypeError, "list"),
        (torch.ones(2, 8, 8, dtype=torch.bool), "4x4", TypeError, "grid"),
        (torch.ones(2, 8, 8, dtype=torch.bool), (4.0, 4), TypeError, "grid"),
        (torch.ones(2, 8, 8, dtype=torch.bool), torch.ones(4, 4), ValueError, "grid features"),
        (torch.ones(2, 8, 8, dtype=torch.bool), (4,), ValueError, "2 or 3 sizes"),
        (torch.ones(2, 8, 8, dtype=torch.bool), (4, 0), ValueError, "2 or 3 sizes"),
        (torch.ones(2, 3, 8, 8, dtype=torch.bool), (4, 4), ValueError, "one channel"),
        (torch.ones(8, 8, dtype=torch.bool), (4, 4), ValueError, "got shape (8, 8)"),
    ],
)
def test_bad_inputs(mask, grid, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        feature_mask(mask, grid)
