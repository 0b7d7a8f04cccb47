"""The OIS model: frozen Depth Anything V2 (ViT + DPT depth head) and the click decoder.

The forward is split the way it is deployed:
- encode(image) -> ImageState: everything that does not depend on the clicks, run once per image;
- decode(state, point_coords, point_labels, prev_mask) -> mask logits, run once per click, for a
  batch of P prompt sets that share one image state by broadcasting (batch-1 state, never copied).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import DecoderBlock, decoder_absorbs
from .dpt import DPTHead
from .order import object_bias, order_bias, order_maps, order_rows, padding_bias
from ..presets import OISConfig
from .prompts import PromptEncoder, click_kinds
from .vit import DinoVisionTransformer

# ImageNet statistics in 0..255 units: the encoder takes raw RGB and normalises inside.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class ImageState(NamedTuple):
    """Encoder outputs; also the names of the encoder graph's outputs and decoder's inputs."""

    image_embed: Tensor  # [B,C,h,w] level-4 ViT tokens projected to decoder width
    pyramid_l1: Tensor  # [B,F,4h,4w] mask-head skip inputs (refinenet1..3, resConfUnit1 applied;
    # l1 also carries the pixel stem, if the config has one)
    pyramid_l2: Tensor  # [B,F,2h,2w]
    pyramid_l3: Tensor  # [B,F,h,w]
    depth: Tensor  # [B,1,S,S] relative inverse depth, min-max normalised per image to [0,1]


class PixelStem(nn.Module):
    """Normalised RGB -> mask-head features at the finest skip's grid (4x the tokens): a
    stride-2 conv, resized to that grid (S/2 to S/3.5), then a conv to the head's width."""

    def __init__(self, channels: int, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(channels, features, 3, padding=1)

    def forward(self, x: Tensor, side: int) -> Tensor:
        x = F.relu(self.conv1(x))
        return self.conv2(F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False))


class OISDecoder(nn.Module):
    """Every OIS parameter beyond Depth Anything V2."""

    def __init__(self, cfg: OISConfig):
        super().__init__()
        d, vit = cfg.decoder, cfg.encoder
        self.neck = nn.Conv2d(vit.embed_dim, d.width, 1)
        self.prompts = PromptEncoder(d.width, vit.patch_size, cfg.input_size, cfg.disk_radius, d.fourier_scale)
        absorb = decoder_absorbs(d)
        self.object_blocks = nn.ModuleList(DecoderBlock(d.width, d.num_heads, d.mlp_ratio, absorb) for _ in range(d.object_blocks))
        self.order_blocks = nn.ModuleList(DecoderBlock(d.width, d.num_heads, d.mlp_ratio, absorb) for _ in range(d.order_blocks))
        # sigma = softplus(order_sigma) > 0, learned
        self.order_sigma = nn.Parameter(torch.tensor(math.log(math.expm1(d.sigma_init))))
        self.mask_head = DPTHead(vit.embed_dim, cfg.depth_head, level4_in_channels=d.width, out_relu=False)
        if d.mask_prompts:  # disks + previous mask at the mask grid -> mask-head features
            self.mask_prompt_embed = nn.Conv2d(3, cfg.depth_head.features, 3, padding=1)
        if d.token_skip:  # prompt-updated tokens -> mask-head features at the token grid
            self.token_skip = nn.Conv2d(d.width, cfg.depth_head.features, 1)
        if d.pixel_stem:
            self.pixel_stem = PixelStem(d.pixel_stem, cfg.depth_head.features)


class OIS(nn.Module):
    def __init__(self, cfg: OISConfig):
        super().__init__()
        self.cfg = cfg
        self.pretrained = DinoVisionTransformer(cfg.encoder, cfg.grid)
        self.depth_head = DPTHead(cfg.encoder.embed_dim, cfg.depth_head)
        self.decoder = OISDecoder(cfg)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)
        # Random init only (loaded weights replace it): a positive disparity bias keeps a random
        # depth map from being all zeros after its ReLU, and a zero logit bias keeps random
        # masks from being all empty, so that parity checks on random weights compare something.
        nn.init.constant_(self.depth_head.scratch.output_conv2[2].bias, 1.0)
        self.init_mask_head_from_depth_head()
        nn.init.zeros_(self.decoder.mask_head.scratch.output_conv2[2].bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.neck.weight.dtype

    def set_order_attention(self, mode: str) -> "OIS":
        """Switch the order-aware attention (bias, mask, off) in place: "off" on a model trained
        with it is the inference-time ablation. The cfg is read at every decode."""
        decoder = dataclasses.replace(self.cfg.decoder, order_attention=mode)  # validates mode
        self.cfg = dataclasses.replace(self.cfg, decoder=decoder)
        return self

    @torch.no_grad()
    def init_mask_head_from_depth_head(self) -> None:
        """The paper initialises its decoders from DAv2: copy every depth-head tensor whose
        shape fits (all but level 4's input projection, which takes decoder tokens)."""
        source = self.depth_head.state_dict()
        for name, tensor in self.decoder.mask_head.state_dict().items():
            if name in source and source[name].shape == tensor.shape:
                tensor.copy_(source[name])

    def train(self, mode: bool = True):
        super().train(mode)
        if not mode:  # the cached pos_embed resize must follow any training step
            self.pretrained.refresh_pos_embed()
        return self

    def encode(self, image: Tensor) -> ImageState:
        """image [B,3,S,S] float RGB in 0..255 (padded, see preprocess)."""
        cfg = self.cfg
        x = ((image.float() - self.pixel_mean) / self.pixel_std).to(self.dtype)
        grid = cfg.grid
        maps = [t.transpose(1, 2).reshape(t.shape[0], t.shape[2], grid, grid) for t in self.pretrained.intermediate_layers(x)]
        depth = F.relu(self.depth_head(maps, cfg.input_size))
        lo = depth.amin(dim=(1, 2, 3), keepdim=True)
        hi = depth.amax(dim=(1, 2, 3), keepdim=True)
        depth = (depth - lo) / (hi - lo).clamp(min=cfg.depth_eps)  # a constant map becomes zeros
        skips = self.decoder.mask_head.skips(maps[:3])
        if cfg.decoder.pixel_stem:  # pixel-level detail into the finest skip (same shape)
            skips[0] = skips[0] + self.decoder.pixel_stem(x, skips[0].shape[-1])
        return ImageState(self.decoder.neck(maps[3]), *skips, depth)

    def decode(self, state: ImageState, point_coords: Tensor, point_labels: Tensor, prev_mask: Tensor) -> Tensor:
        """state of batch 1 (one image shared by the P prompt sets; training may give batch P,
        one image per prompt set); point_coords [P,N,2] (x, y in the SxS frame); point_labels [P,N]
        (1, 0, -1 padding); prev_mask [P,1,S,S] probability -> mask logits [P,1,S',S'] float32."""
        cfg, dec = self.cfg, self.decoder
        dtype, patch, grid = self.dtype, cfg.encoder.patch_size, cfg.grid
        coords = point_coords.float()
        kinds = click_kinds(point_labels)

        dense = dec.prompts.dense(coords, kinds, prev_mask)
        image = (state.image_embed + dense).flatten(2).transpose(1, 2)  # [P,L,C]
        clicks = dec.prompts.sparse(coords, kinds).to(dtype)
        image_pe = dec.prompts.positions.grid(grid, cfg.input_size).to(dtype)

        mv = cfg.decoder.mask_value
        key_bias = padding_bias(kinds, mv)
        guide = object_bias(prev_mask, kinds, patch, cfg.decoder.object_mask_threshold, mv)
        for block in dec.object_blocks:
            clicks, image = block(clicks, image, image_pe, guide, key_bias)
        o_pos, o_neg = order_maps(state.depth, coords, kinds, patch, cfg.decoder.order_eps)
        guide = order_bias(
            order_rows(o_pos, o_neg, kinds),
            kinds,
            cfg.decoder.order_attention,
            F.softplus(dec.order_sigma.float()),
            cfg.decoder.order_mask_threshold,
            mv,
        )
        for block in dec.order_blocks:
            clicks, image = block(clicks, image, image_pe, guide, key_bias)

        image = image.transpose(1, 2).reshape(image.shape[0], -1, grid, grid)
        head = dec.mask_head
        skips = [state.pyramid_l1, state.pyramid_l2, state.pyramid_l3]
        extra = None
        if cfg.decoder.mask_prompts:
            fine = dec.prompts.at_mask_grid(coords, kinds, prev_mask, cfg.mask_size)
            extra = dec.mask_prompt_embed(fine.to(dtype))
        at_grid = dec.token_skip(image) if cfg.decoder.token_skip else None
        features = head.fuse(image, skips, out_scale=cfg.decoder.mask_scale // 4, extra=extra, at_grid=at_grid)
        return head.output(features)

    def forward(self, image: Tensor, point_coords: Tensor, point_labels: Tensor, prev_mask: Tensor) -> Tensor:
        return self.decode(self.encode(image), point_coords, point_labels, prev_mask)


def count_parameters(model: OIS) -> dict[str, int]:
    """Parameter split as `ois-deploy info` reports it."""
    parts = {"encoder": model.pretrained, "depth_head": model.depth_head, "decoder": model.decoder}
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    counts["total"] = sum(counts.values())
    return counts
