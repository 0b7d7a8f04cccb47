"""DINOv2 ViT with the module names of the official Depth Anything V2 code (key prefix
`pretrained.`), so official checkpoints load with strict=True and no key mapping."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import attend
from ..presets import ViTConfig


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.impl = "sdpa"

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(attend(q, k, v, None, self.impl).transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf GELU, as DINOv2
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (FP32 island, docs/design.md §4)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(
            x.dtype
        )


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = LayerNorm32(dim, eps=1e-6)
        self.attn = SelfAttention(dim, cfg.num_heads)
        self.ls1 = LayerScale(dim, cfg.layerscale_init)
        self.norm2 = LayerNorm32(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.ls2 = LayerScale(dim, cfg.layerscale_init)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig, grid: int):
        super().__init__()
        self.cfg = cfg
        self.grid = grid
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Kept at the checkpoint's grid so official files load strictly; see pos_embed_grid.
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pretrained_grid**2, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # in the checkpoints, unused at inference
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = LayerNorm32(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        # pos_embed resized to the preset's grid once (float32, at load), so that no bicubic
        # resize sits in an exported graph. Not saved: it is derived from pos_embed.
        self.register_buffer("pos_embed_grid", self.resized_pos_embed().detach().clone(), persistent=False)

    def resized_pos_embed(self) -> Tensor:
        """Bicubic resize of the stored grid as DINOv2 does it (scale factor with a 0.1 offset)."""
        pos = self.pos_embed.float()
        src = self.cfg.pretrained_grid
        if src == self.grid:
            return pos
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        scale = (self.grid + self.cfg.pos_interp_offset) / src
        patch_pos = F.interpolate(
            patch_pos.reshape(1, src, src, -1).permute(0, 3, 1, 2),
            scale_factor=(scale, scale),
            mode="bicubic",
            antialias=False,
        )
        assert patch_pos.shape[-2:] == (self.grid, self.grid)
        return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, self.grid**2, -1)], dim=1)

    @torch.no_grad()
    def refresh_pos_embed(self) -> None:
        self.pos_embed_grid = self.resized_pos_embed().detach().clone()

    def intermediate_layers(self, x: Tensor) -> list[Tensor]:
        """Tokens [B, h*w, D] after each configured block, through the final norm, no class token."""
        x = self.patch_embed(x)
        # Training keeps pos_embed differentiable; inference uses the cached resize.
        pos = self.resized_pos_embed() if self.training else self.pos_embed_grid
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = (x.float() + pos.float()).to(x.dtype)  # FP32 island: position embedding add
        wanted = set(self.cfg.intermediate_layers)
        outputs = []
        for i, block in enumerate(self.blocks[: max(wanted) + 1]):
            x = block(x)
            if i in wanted:
                outputs.append(self.norm(x)[:, 1:])
        return outputs
