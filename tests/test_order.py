"""Order maps against values computed by hand."""

import torch

from ois_deploy.model.order import order_bias, order_maps, order_rows, sample_click_depth
from ois_deploy.model.prompts import click_kinds


def depth_4x4_tokens():
    """An 8x8 normalised depth map made of 2x2 blocks (patch 2 -> a 4x4 token grid)."""
    tokens = torch.tensor(
        [[0.0, 0.1, 0.2, 0.3], [0.4, 0.5, 0.6, 0.7], [0.8, 0.9, 1.0, 0.5], [0.2, 0.2, 0.2, 0.2]]
    )
    return tokens.repeat_interleave(2, 0).repeat_interleave(2, 1)[None, None], tokens.flatten()


def test_click_depth_is_read_at_the_nearest_pixel():
    depth, _ = depth_4x4_tokens()
    coords = torch.tensor([[[0.0, 0.0], [4.4, 2.0], [7.0, 7.0], [-3.0, 99.0]]])
    got = sample_click_depth(depth, coords)
    assert torch.allclose(got, torch.tensor([[0.0, 0.6, 0.2, 0.2]]))


def test_order_maps_by_hand():
    depth, d = depth_4x4_tokens()
    # two positives (depths 0.0 and 1.0 -> mean 0.5), one negative at depth 0.3, one padding
    coords = torch.tensor([[[0.0, 0.0], [4.0, 4.0], [6.0, 0.0], [3.0, 3.0]]])
    kinds = click_kinds(torch.tensor([[1, 1, 0, -1]]))
    o_pos, o_neg = order_maps(depth, coords, kinds, patch=2, eps=0.0)

    expected_pos = (d - 0.5).abs() / (d - 0.5).abs().max()
    torch.testing.assert_close(o_pos[0, 0], expected_pos)
    expected_neg = (d - 0.3).abs() / (d - 0.3).abs().max()
    torch.testing.assert_close(o_neg[0, 2], expected_neg)
    assert o_pos.min() == 0 and o_pos.max() == 1  # 0: same order as the prompt; normalised

    rows = order_rows(o_pos, o_neg, kinds)
    torch.testing.assert_close(rows[0, 0], expected_pos)  # positives share O+
    torch.testing.assert_close(rows[0, 1], expected_pos)
    torch.testing.assert_close(rows[0, 2], expected_neg)  # a negative has its own map
    assert (rows[0, 3] == 0).all()  # padding


def test_order_bias_modes():
    rows = torch.tensor([[[0.0, 0.2, 1.0]]])
    kinds = click_kinds(torch.tensor([[1]]))
    bias = order_bias(rows, kinds, "bias", torch.tensor(0.5), 0.5, -1e4)
    torch.testing.assert_close(bias, torch.tensor([[[0.0, -0.4, -2.0]]]))
    hard = order_bias(rows, kinds, "mask", torch.tensor(0.5), 0.5, -1e4)
    assert hard.tolist() == [[[0.0, 0.0, -1e4]]]
    off = order_bias(rows, kinds, "off", torch.tensor(0.5), 0.5, -1e4)
    assert off.tolist() == [[[0.0, 0.0, 0.0]]]


def test_constant_depth_gives_zero_maps_without_nan():
    depth = torch.full((1, 1, 8, 8), 0.0)
    kinds = click_kinds(torch.tensor([[1, 0]]))
    o_pos, o_neg = order_maps(depth, torch.tensor([[[1.0, 1.0], [5.0, 5.0]]]), kinds, patch=2, eps=1e-6)
    assert torch.isfinite(o_pos).all() and torch.isfinite(o_neg).all()
    assert o_pos.abs().max() == 0 and o_neg.abs().max() == 0
