"""Precision policy (docs/design.md §4): FP16 weights and activations with explicit FP32 islands.

The islands are part of the model code, so they survive export and TensorRT's strongly typed
builds: LayerNorm (LayerNorm32), attention logits and softmax (attend), the Fourier position
features, the ViT position embedding add, depth normalisation and order maps (encode/order),
and the final mask logits. This function only keeps the islands' own tensors in float32.
"""

from __future__ import annotations

import copy

import torch

from .ois import OIS
from .vit import LayerNorm32


def to_fp16(model: OIS) -> OIS:
    """A float16 copy of the model whose FP32-island tensors stay float32."""
    fp16 = copy.deepcopy(model).half()
    for src, dst in zip(model.modules(), fp16.modules()):
        if isinstance(src, LayerNorm32):
            dst.float()
    keep_fp32 = [
        ("pretrained", "pos_embed_grid"),  # resized in float32 at load; added in float32
        ("decoder.prompts.positions", "gaussian"),
        ("", "pixel_mean"),
        ("", "pixel_std"),
    ]
    for module_path, name in keep_fp32:
        src = model.get_submodule(module_path)
        setattr(fp16.get_submodule(module_path), name, getattr(src, name).detach().float().clone())
    fp16.decoder.order_sigma.data = model.decoder.order_sigma.detach().float().clone()
    for head in (fp16.depth_head, fp16.decoder.mask_head):
        head.scratch.output_conv2[2].float()  # the depth / logits conv
    return fp16.eval()


def islands_dtype_report(model: OIS) -> dict[str, torch.dtype]:
    """dtypes of the island tensors, for tests and lint messages."""
    return {
        "layer_norm": model.pretrained.norm.weight.dtype,
        "pos_embed_grid": model.pretrained.pos_embed_grid.dtype,
        "fourier": model.decoder.prompts.positions.gaussian.dtype,
        "logits_conv": model.decoder.mask_head.scratch.output_conv2[2].weight.dtype,
        "depth_conv": model.depth_head.scratch.output_conv2[2].weight.dtype,
        "body": model.dtype,
    }
