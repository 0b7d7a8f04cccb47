"""Prompt encoders (docs/design.md §2.3): sparse click tokens and dense disk + previous-mask maps.

Clicks are (x, y) in the SxS input frame, integers at pixel centres; labels 1 positive,
0 negative, -1 padding. Everything here is loop-free tensor arithmetic so that it exports
with fixed shapes: no data-dependent Tile, OneHot, NonZero or If.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ClickKinds(NamedTuple):
    """Float {0,1} masks [P,N] of positive, negative and padding clicks."""

    pos: Tensor
    neg: Tensor
    pad: Tensor


def click_kinds(labels: Tensor) -> ClickKinds:
    """Labels may be int or float; compare against half-way thresholds so both work."""
    labels = labels.float()
    pos = (labels > 0.5).float()
    pad = (labels < -0.5).float()
    return ClickKinds(pos, 1.0 - pos - pad, pad)


class FourierPositions(nn.Module):
    """Random Fourier features of normalised (x, y) positions (SAM's PositionEmbeddingRandom)."""

    def __init__(self, dim: int, scale: float):
        super().__init__()
        self.register_buffer("gaussian", scale * torch.randn(2, dim // 2))

    def forward(self, xy01: Tensor) -> Tensor:
        """xy01 [..., 2] in [0, 1] -> [..., dim], computed in float32 (FP32 island)"""
        proj = (2.0 * xy01.float() - 1.0) @ self.gaussian.float() * (2.0 * math.pi)
        return torch.cat([proj.sin(), proj.cos()], dim=-1)

    def grid(self, side: int, input_size: int) -> Tensor:
        """Encoding of the token-grid centres, [1, side*side, dim] (row-major)."""
        c = (torch.arange(side, dtype=torch.float32, device=self.gaussian.device) + 0.5) / side
        ys, xs = torch.meshgrid(c, c, indexing="ij")
        return self(torch.stack([xs, ys], dim=-1).reshape(1, side * side, 2))


class PromptEncoder(nn.Module):
    def __init__(self, width: int, patch: int, input_size: int, disk_radius: float, fourier_scale: float):
        super().__init__()
        self.input_size = input_size
        self.disk_radius = disk_radius
        self.positions = FourierPositions(width, fourier_scale)
        self.label_embed = nn.Parameter(torch.randn(3, width) * 0.02)  # positive, negative, padding
        # positive disks, negative disks, previous-mask probability -> decoder tokens
        self.dense_embed = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def sparse(self, coords: Tensor, kinds: ClickKinds) -> Tensor:
        """Click tokens [P,N,C]: position encoding + label embedding; padding gets no position."""
        pe = self.positions((coords + 0.5) / self.input_size)
        pos, neg, pad = (k.unsqueeze(-1) for k in kinds)
        e = self.label_embed.float()
        return (pe + e[0]) * pos + (pe + e[1]) * neg + e[2] * pad

    def disks(self, coords: Tensor, kinds: ClickKinds, side: int | None = None) -> Tensor:
        """[P,2,side,side] float maps of positive and negative click disks, on a grid of the SxS
        frame (side S by default: one cell per pixel; cell centres as in a half-pixel resize)."""
        s = side or self.input_size
        step = self.input_size / s
        ramp = (torch.arange(s, dtype=coords.dtype, device=coords.device) + 0.5) * step - 0.5
        dx2 = (ramp.view(1, 1, 1, s) - coords[..., 0, None, None]) ** 2  # [P,N,1,side]
        dy2 = (ramp.view(1, 1, s, 1) - coords[..., 1, None, None]) ** 2  # [P,N,side,1]
        # A pixel is in a disk when its squared distance to the nearest click of that kind is
        # within r^2. Clicks of other kinds are pushed out by 2r^2 (distances are >= 0) on the
        # small [P,N,1,side] factor, so the full-size work is one add and one min per map
        # (rendering every disk and masking it afterwards cost a fifth of a training decode).
        r2 = self.disk_radius**2

        def nearest(kind: Tensor) -> Tensor:
            return (dx2 + (1.0 - kind[..., None, None]) * (2 * r2) + dy2).amin(dim=1, keepdim=True)

        return torch.cat([(nearest(kinds.pos) <= r2).float(), (nearest(kinds.neg) <= r2).float()], dim=1)

    def dense(self, coords: Tensor, kinds: ClickKinds, prev_mask: Tensor) -> Tensor:
        """[P,C,h,w] embedding of disks and previous mask, added to the image tokens."""
        maps = torch.cat([self.disks(coords, kinds), prev_mask.float()], dim=1)
        return self.dense_embed(maps.to(self.dense_embed.weight.dtype))

    def at_mask_grid(self, coords: Tensor, kinds: ClickKinds, prev_mask: Tensor, side: int) -> Tensor:
        """[P,3,side,side] disks and previous mask resampled to the mask head's grid (float32)."""
        prev = F.interpolate(prev_mask.float(), size=(side, side), mode="bilinear", align_corners=False)
        return torch.cat([self.disks(coords, kinds, side), prev], dim=1)
