"""DPT head with the module names of the official Depth Anything V2 code (key prefix
`depth_head.`). The same class, with a different level-4 input and no final ReLU, is the OIS
mask head (docs/design.md §2.6), initialised from the depth head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..presets import DPTConfig


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)
        self.activation = nn.ReLU(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.activation(self.conv1(self.activation(x)))) + x


class FeatureFusionBlock(nn.Module):
    """RefineNet fusion. resConfUnit1 only sees the skip input, which never depends on the
    clicks, so callers pass its result (`skip_res`) computed once per image."""

    def __init__(self, features: int):
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: Tensor, skip_res: Tensor | None, size: tuple[int, int]) -> Tensor:
        if skip_res is not None:
            x = x + skip_res
        # DAv2 resizes, then applies out_conv. A 1x1 conv commutes with a bilinear resize (whose
        # weights sum to 1), so it runs on the smaller map first: the same function, up to float
        # rounding, at a quarter of the cost. A resize to the same size is the identity.
        x = self.out_conv(self.resConfUnit2(x))
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class Scratch(nn.Module):
    def __init__(self, in_channels: tuple[int, ...], features: int, out_relu: bool):
        super().__init__()
        for i, c in enumerate(in_channels, start=1):
            setattr(self, f"layer{i}_rn", nn.Conv2d(c, features, 3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self, f"refinenet{i}", FeatureFusionBlock(features))
        self.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
        last = [nn.ReLU(True), nn.Identity()] if out_relu else []
        self.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, 32, 3, padding=1), nn.ReLU(True), nn.Conv2d(32, 1, 1), *last
        )


def conv_of_projection(conv: nn.Conv2d, project: nn.Conv2d, x: Tensor) -> Tensor:
    """conv(project(x)) for a 1x1 `project`, as one conv whose kernel has the projection folded
    in: the same function up to float rounding, at the cost of a conv on x's (fewer) channels,
    with no map at the projection's width. project's bias, which conv's zero padding never
    sees, becomes a constant map: itself through conv, on a map of ones, plus conv's bias. The
    folding is arithmetic on weights only (constant-folded in the exported graphs), in float32."""
    weight = conv.weight.float()  # [O,M,k,k]
    projection = project.weight.float()[:, :, 0, 0]  # [M,C]
    folded = (weight.permute(0, 2, 3, 1) @ projection).permute(0, 3, 1, 2)  # [O,C,k,k]
    bias_kernel = (weight * project.bias.float().view(1, -1, 1, 1)).sum(dim=1, keepdim=True)  # [O,1,k,k]
    ones = torch.ones((1, 1, *x.shape[-2:]), dtype=torch.float32, device=x.device)
    bias_map = F.conv2d(ones, bias_kernel, conv.bias.float(), conv.stride, conv.padding)  # [1,O,h',w']
    return F.conv2d(x, folded.to(x.dtype), None, conv.stride, conv.padding) + bias_map.to(x.dtype)


class DPTHead(nn.Module):
    """levels 1-3 come from ViT tokens; level 4 from ViT tokens (depth) or decoder tokens (mask)."""

    def __init__(self, in_channels: int, cfg: DPTConfig, level4_in_channels: int | None = None, out_relu=True):
        super().__init__()
        self.output_at_fusion_grid = cfg.output_at_fusion_grid
        oc = cfg.out_channels
        ins = [in_channels] * 3 + [level4_in_channels or in_channels]
        self.projects = nn.ModuleList(nn.Conv2d(i, o, 1) for i, o in zip(ins, oc))
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(oc[0], oc[0], kernel_size=4, stride=4),
                nn.ConvTranspose2d(oc[1], oc[1], kernel_size=2, stride=2),
                nn.Identity(),
                nn.Conv2d(oc[3], oc[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        self.scratch = Scratch(oc, cfg.features, out_relu)

    def _level(self, i: int, x: Tensor) -> Tensor:
        """Reassemble level i (0-based) from a [B,C,h,w] map and project it to `features`."""
        project, resize = self.projects[i], self.resize_layers[i]
        if isinstance(resize, nn.Conv2d):  # level 4: a 1x1 projection, then a 3x3 stride-2 conv
            x = conv_of_projection(resize, project, x)
        else:
            x = resize(project(x))
        return getattr(self.scratch, f"layer{i + 1}_rn")(x)

    def skips(self, maps: list[Tensor]) -> list[Tensor]:
        """Click-independent skip inputs of refinenet1..3, resConfUnit1 applied."""
        return [getattr(self.scratch, f"refinenet{i + 1}").resConfUnit1(self._level(i, m)) for i, m in enumerate(maps)]

    def fuse(
        self, level4: Tensor, skips: list[Tensor], out_scale: int = 2, extra: Tensor | None = None, at_grid: Tensor | None = None
    ) -> Tensor:
        """Top-down fusion from the level-4 map through refinenet4..1 and output_conv1.
        skips may have batch 1 and broadcast over level4's batch. refinenet1 resizes to
        out_scale x its input (2 in DAv2; the mask head may stop at 1). `extra`, a map at
        refinenet1's output size, is added before output_conv1 (the mask head's own prompts);
        `at_grid`, a map at the token grid, is added to refinenet3's skip (the mask head's tokens)."""
        s = self.scratch
        s1, s2, s3 = skips
        x = s.refinenet4(self._level(3, level4), None, s3.shape[-2:])
        if at_grid is not None:
            s3 = s3 + at_grid
        x = s.refinenet3(x, s3, s2.shape[-2:])
        x = s.refinenet2(x, s2, s1.shape[-2:])
        x = s.refinenet1(x, s1, (out_scale * s1.shape[-2], out_scale * s1.shape[-1]))
        if extra is not None:
            x = x + extra
        return s.output_conv1(x)

    def output(self, x: Tensor) -> Tensor:
        """output_conv2 with its last (1-channel) conv in float32: the depth that is min-max
        normalised next, and the mask logits, are FP32 islands (docs/design.md §4)."""
        convs = self.scratch.output_conv2
        last = convs[2]
        x = F.conv2d(convs[:2](x).float(), last.weight.float(), last.bias.float())
        return convs[3:](x)

    def forward(self, maps: list[Tensor], out_size: int) -> Tensor:
        """Depth from the four [B,D,h,w] token maps -> [B,1,out_size,out_size] (ReLU'd disparity)."""
        x = self.fuse(maps[3], self.skips(maps[:3]))
        resize = lambda t: F.interpolate(t, size=(out_size, out_size), mode="bilinear", align_corners=True)  # noqa: E731
        return resize(self.output(x)) if self.output_at_fusion_grid else self.output(resize(x))
