"""Order maps (docs/design.md §2.4) and the attention guidance built from them and the previous mask.

Order maps say how far each image token's depth is from the clicked object's depth:
O+ = |D - mean of D at the positive clicks|, one O-_j = |D - D(n_j)| per negative click,
each divided by its own maximum, so 0 means "same depth order as the prompt".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import masked_bias
from .prompts import ClickKinds


def sample_click_depth(depth: Tensor, coords: Tensor) -> Tensor:
    """Depth [1 or P,1,S,S] at the pixels nearest to coords [P,N,2] -> [P,N] (a Gather, no
    grid_sample). Deployment shares one image (batch 1); training gives one image per prompt set."""
    s = depth.shape[-1]
    xy = torch.floor(coords + 0.5).clamp(0, s - 1).long()
    index = xy[..., 1] * s + xy[..., 0]
    if depth.shape[0] == 1:
        return depth.reshape(-1)[index]
    return depth.flatten(1).gather(1, index)


def order_maps(depth: Tensor, coords: Tensor, kinds: ClickKinds, patch: int, eps: float):
    """Returns (O+ [P,1,L], O- [P,N,L]) at the token grid (L = h*w) from normalised depth
    [1 or P,1,S,S]. O- is computed for every click; rows of non-negative clicks are not used."""
    d_tokens = F.avg_pool2d(depth.float(), patch).flatten(2)  # [1 or P,1,L]
    d_click = sample_click_depth(depth.float(), coords)  # [P,N]
    n_pos = kinds.pos.sum(dim=-1, keepdim=True).clamp(min=1.0)
    d_pos = (d_click * kinds.pos).sum(dim=-1, keepdim=True) / n_pos  # [P,1]
    o_pos = (d_tokens - d_pos.unsqueeze(-1)).abs()  # [P,1,L]
    o_neg = (d_tokens - d_click.unsqueeze(-1)).abs()  # [P,N,L]
    o_pos = o_pos / (o_pos.amax(dim=-1, keepdim=True) + eps)
    o_neg = o_neg / (o_neg.amax(dim=-1, keepdim=True) + eps)
    return o_pos, o_neg


def order_rows(o_pos: Tensor, o_neg: Tensor, kinds: ClickKinds) -> Tensor:
    """The order map each click token attends with [P,N,L]: O+ for positives, its own O-_j
    for negative j, zeros for padding (padding rows are never read)."""
    return o_pos * kinds.pos.unsqueeze(-1) + o_neg * kinds.neg.unsqueeze(-1)


def order_bias(rows: Tensor, kinds: ClickKinds, mode: str, sigma: Tensor, threshold: float, mask_value: float):
    """Additive attention bias [P,N,L] of the order-aware block. bias: -O/sigma (the default);
    mask: tokens with O above threshold masked; off: no order guidance (the paper's ablation)."""
    if mode == "bias":
        return -rows / sigma
    if mode == "off":
        return torch.zeros_like(rows)
    return masked_bias((rows <= threshold).float(), mask_value)


def object_bias(prev_mask: Tensor, kinds: ClickKinds, patch: int, threshold: float, mask_value: float):
    """Object-aware bias [P,N,L]: positives see tokens inside the previous mask, negatives
    those outside; padding rows see everything. Empty rows fall back to plain attention."""
    inside = (F.avg_pool2d(prev_mask.float(), patch).flatten(1) >= threshold).float().unsqueeze(1)  # [P,1,L]
    pos, neg, pad = (k.unsqueeze(-1) for k in kinds)
    allowed = pos * inside + neg * (1.0 - inside) + pad
    return masked_bias(allowed, mask_value)


def padding_bias(kinds: ClickKinds, mask_value: float) -> Tensor:
    """Bias [P,1,N] that hides padding click tokens as attention keys."""
    return masked_bias(1.0 - kinds.pad.unsqueeze(1), mask_value)
