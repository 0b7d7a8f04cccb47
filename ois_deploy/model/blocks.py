"""Decoder block (docs/design.md §2.5, Cutie-style, pre-norm residuals).

1. click tokens -> image cross-attention, guided by an additive bias (object- or order-aware);
2. click-token self-attention; 3. click MLP;
4. image -> click-token cross-attention (padding keys hidden); 5. image MLP.
"""

from __future__ import annotations

from torch import Tensor, nn

from .attention import Attention
from .vit import LayerNorm32
from ..presets import DecoderConfig


def decoder_absorbs(d: DecoderConfig) -> bool:
    """Whether the cross-attentions fold the image side's projections into the click tokens:
    that costs heads x clicks x width per image token against width x (width + clicks) for
    projecting, so it is used where it is no dearer at max_clicks ((heads - 1) x max_clicks <=
    width: ois-s/b/l, 8 heads at width 256; not ois-tiny, 4 heads at width 64)."""
    return (d.num_heads - 1) * d.max_clicks <= d.width


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, ratio: float):
        super().__init__(nn.Linear(dim, int(dim * ratio)), nn.GELU(), nn.Linear(int(dim * ratio), dim))


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, absorb: bool = False):
        """absorb: the image-token side's projections folded into the click tokens (Attention)."""
        super().__init__()
        self.norm_image_kv = LayerNorm32(dim)
        self.norm_click_q = LayerNorm32(dim)
        self.click_to_image = Attention(dim, num_heads, "keys" if absorb else None)
        self.norm_self = LayerNorm32(dim)
        self.self_attn = Attention(dim, num_heads)
        self.norm_click_mlp = LayerNorm32(dim)
        self.click_mlp = FeedForward(dim, mlp_ratio)
        self.norm_image_q = LayerNorm32(dim)
        self.norm_click_kv = LayerNorm32(dim)
        self.image_to_click = Attention(dim, num_heads, "queries" if absorb else None)
        self.norm_image_mlp = LayerNorm32(dim)
        self.image_mlp = FeedForward(dim, mlp_ratio)

    def forward(
        self, clicks: Tensor, image: Tensor, image_pe: Tensor, guide_bias: Tensor, key_bias: Tensor
    ) -> tuple[Tensor, Tensor]:
        """clicks [P,N,C] (position already encoded), image [P,L,C], image_pe [1,L,C],
        guide_bias [P,N,L], key_bias [P,1,N]."""
        img = self.norm_image_kv(image)
        clicks = clicks + self.click_to_image(self.norm_click_q(clicks), img + image_pe, img, guide_bias)
        c = self.norm_self(clicks)
        clicks = clicks + self.self_attn(c, c, c, key_bias)
        clicks = clicks + self.click_mlp(self.norm_click_mlp(clicks))
        c = self.norm_click_kv(clicks)
        image = image + self.image_to_click(self.norm_image_q(image) + image_pe, c, c, key_bias)
        image = image + self.image_mlp(self.norm_image_mlp(image))
        return clicks, image
