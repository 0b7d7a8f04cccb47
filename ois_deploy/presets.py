"""Model configurations. Every choice docs/design.md marks as ours is a field here, not a constant."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import UserError
from .schema import Field, SchemaError, check

PATCH = 14
ORDER_ATTENTION_MODES = ("bias", "mask", "off")


@dataclass(frozen=True)
class ViTConfig:
    """DINOv2 ViT as used by Depth Anything V2."""

    variant: str  # vits | vitb | vitl | tiny: names the official checkpoint family it loads
    embed_dim: int
    depth: int
    num_heads: int
    intermediate_layers: tuple[int, ...]
    mlp_ratio: float = 4.0
    patch_size: int = PATCH
    pretrained_grid: int = 37  # side of the pos_embed grid stored in checkpoints (518 / 14)
    layerscale_init: float = 1.0
    # DINOv2 resizes pos_embed with scale_factor=(g + offset) / grid, bicubic, no antialias.
    pos_interp_offset: float = 0.1


@dataclass(frozen=True)
class DPTConfig:
    """DPT head of Depth Anything V2."""

    features: int
    out_channels: tuple[int, int, int, int]
    # False (DAv2): resize the fused features to the input size, then run output_conv2 there.
    # True: run output_conv2 at the fusion's own grid (8x the tokens) and resize the one-channel
    # depth: a third of the pixels at 280 px, where those convs were the costliest of training.
    output_at_fusion_grid: bool = False


@dataclass(frozen=True)
class DecoderConfig:
    """The OIS click decoder (docs/design.md §2.3-2.6)."""

    width: int = 256
    num_heads: int = 8
    object_blocks: int = 1  # object-aware blocks, run first
    order_blocks: int = 1  # order-aware blocks, run second
    mlp_ratio: float = 4.0
    order_attention: str = "bias"  # bias: logits - O/sigma; mask: hard threshold; off: none (ablations)
    order_mask_threshold: float = 0.5  # used by order_attention="mask"
    sigma_init: float = 0.5  # initial sigma = softplus(s) of the order bias
    object_mask_threshold: float = 0.5  # prev-mask probability counted as "inside"
    max_clicks: int = 24
    mask_scale: int = 4  # mask_logits side S' = mask_scale x token grid (4: S/3.5, as SAM's S/4)
    # Also give the mask head the disks and previous mask at its own resolution S': the dense
    # embedding at the token grid loses everything below a patch, so refinement clicks stall.
    mask_prompts: bool = False
    # Channels of a conv stem on the pixels (0: none, the paper's model). Its features join the
    # mask head's finest skip (4x the token grid): the ViT skips are upsampled 14 px tokens, with
    # no edge finer than a token for a thin part to follow. It runs in the encoder graph.
    pixel_stem: int = 0
    # Also add the decoder's image tokens to the mask head's skip at the token grid (refinenet3).
    # Otherwise they reach it only through level 4's stride-2 conv, at half the token grid, so the
    # click-dependent map is 28 px cells at 280 px: one cell for a small object.
    token_skip: bool = False
    disk_radius_at_1024: float = 5.0  # click disk radius in pixels at S=1024, scaled with S
    fourier_scale: float = 1.0  # std of the random Fourier features of click positions
    mask_value: float = -1e4  # finite "minus infinity" of masked attention, safe in fp16
    order_eps: float = 1e-6  # guards each order map's division by its maximum

    def __post_init__(self):
        if self.order_attention not in ORDER_ATTENTION_MODES:
            raise ValueError(f"order_attention must be one of {ORDER_ATTENTION_MODES}, not {self.order_attention!r}")
        if self.mask_scale not in (4, 8):
            raise ValueError("mask_scale must be 4 or 8")
        if self.width % self.num_heads:
            raise ValueError("decoder width must be a multiple of num_heads")


@dataclass(frozen=True)
class OISConfig:
    name: str
    input_size: int  # S: square input side, a multiple of the patch size
    encoder: ViTConfig
    depth_head: DPTConfig
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    depth_eps: float = 1e-6  # guards min-max normalisation of a constant depth map

    def __post_init__(self):
        if self.input_size % self.encoder.patch_size:
            raise ValueError(f"input size {self.input_size} is not a multiple of {self.encoder.patch_size}")

    @property
    def grid(self) -> int:
        """Token grid side h = w = S / patch."""
        return self.input_size // self.encoder.patch_size

    @property
    def mask_size(self) -> int:
        """Side S' of mask_logits: where the DPT fusion path ends (4x or 8x the token grid)."""
        return self.decoder.mask_scale * self.grid

    @property
    def disk_radius(self) -> float:
        return self.decoder.disk_radius_at_1024 * self.input_size / 1024

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "checkpoint") -> "OISConfig":
        """A config read from a file, validated against CONFIG_SCHEMA (types, ranges, divisibility,
        a parameter-count estimate) before any model is built from it; errors name the field."""
        validate_config(d, source)
        try:
            enc = dict(d["encoder"])
            enc["intermediate_layers"] = tuple(enc["intermediate_layers"])
            head = dict(d["depth_head"])
            head["out_channels"] = tuple(head["out_channels"])
            rest = {k: v for k, v in d.items() if k not in ("encoder", "depth_head", "decoder")}
            return cls(
                encoder=ViTConfig(**enc),
                depth_head=DPTConfig(**head),
                decoder=DecoderConfig(**d.get("decoder", {})),
                **rest,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"invalid model config in {source}: {e}") from None


# The config as a file holds it (to_dict): field -> type and range. Limits are far above every
# preset and keep a hostile file from allocating a huge model before it fails.
MAX_PARAMS = 2e9
_POS, _FRACTION = dict(min=1e-12), dict(min=0.0, max=1.0)
CONFIG_SCHEMA = {
    "name": Field(str),
    "input_size": Field(int, min=PATCH, max=4096),
    "depth_eps": Field(float, False, min=1e-12, max=1.0),
    "encoder": Field(dict),
    "encoder.variant": Field(str, choices=("vits", "vitb", "vitl", "tiny")),
    "encoder.embed_dim": Field(int, min=1, max=4096),
    "encoder.depth": Field(int, min=1, max=64),
    "encoder.num_heads": Field(int, min=1, max=256),
    "encoder.intermediate_layers": Field((list, int), min=0, max=63, length=4),
    "encoder.mlp_ratio": Field(float, False, min=0.25, max=16),
    "encoder.patch_size": Field(int, False, min=1, max=64),
    "encoder.pretrained_grid": Field(int, False, min=1, max=256),
    "encoder.layerscale_init": Field(float, False, min=-1e3, max=1e3),
    "encoder.pos_interp_offset": Field(float, False, min=-1.0, max=1.0),
    "depth_head": Field(dict),
    "depth_head.features": Field(int, min=1, max=4096),
    "depth_head.out_channels": Field((list, int), min=1, max=4096, length=4),
    "depth_head.output_at_fusion_grid": Field(bool, False),
    "decoder": Field(dict, False),
    "decoder.width": Field(int, False, min=1, max=4096),
    "decoder.num_heads": Field(int, False, min=1, max=256),
    "decoder.object_blocks": Field(int, False, min=0, max=64),
    "decoder.order_blocks": Field(int, False, min=0, max=64),
    "decoder.mlp_ratio": Field(float, False, min=0.25, max=16),
    "decoder.order_attention": Field(str, False, choices=ORDER_ATTENTION_MODES),
    "decoder.order_mask_threshold": Field(float, False, **_FRACTION),
    "decoder.sigma_init": Field(float, False, min=-100, max=100),
    "decoder.object_mask_threshold": Field(float, False, **_FRACTION),
    "decoder.max_clicks": Field(int, False, min=1, max=256),
    "decoder.mask_scale": Field(int, False, choices=(4, 8)),
    "decoder.mask_prompts": Field(bool, False),
    "decoder.pixel_stem": Field(int, False, min=0, max=1024),
    "decoder.token_skip": Field(bool, False),
    "decoder.disk_radius_at_1024": Field(float, False, **_POS, max=1024),
    "decoder.fourier_scale": Field(float, False, **_POS, max=1e4),
    "decoder.mask_value": Field(float, False, min=-6e4, max=0),  # finite in fp16
    "decoder.order_eps": Field(float, False, **_POS, max=1.0),
}


def estimate_params(d: dict) -> float:
    """A rough upper estimate of the parameter count of a (schema-checked) config dict."""
    enc, head, dec = d["encoder"], d["depth_head"], d.get("decoder", {})
    dim, ratio, patch = enc["embed_dim"], enc.get("mlp_ratio", 4.0), enc.get("patch_size", PATCH)
    vit = enc["depth"] * (4 + 2 * ratio) * dim**2 + 3 * patch**2 * dim + (enc.get("pretrained_grid", 37) ** 2 + 1) * dim
    f, oc = head["features"], head["out_channels"]
    dpt = sum(dim * c + 16 * c * c + 9 * c * f for c in oc) + 40 * 9 * f * f
    width = dec.get("width", 256)
    blocks = dec.get("object_blocks", 1) + dec.get("order_blocks", 1)
    decoder = 2 * blocks * (8 + 2 * dec.get("mlp_ratio", 4.0)) * width**2 + dpt / 2 + 9 * dim * width
    return vit + dpt + decoder


def validate_config(d: dict, source: str = "checkpoint") -> None:
    where = f"model config in {source}"
    try:
        check(d, CONFIG_SCHEMA)
        enc, dec = d["encoder"], d.get("decoder", {})
        if enc["embed_dim"] % enc["num_heads"]:
            raise SchemaError(f"encoder.num_heads: {enc['num_heads']} does not divide encoder.embed_dim {enc['embed_dim']}")
        width, heads = dec.get("width", 256), dec.get("num_heads", 8)
        if width % heads:
            raise SchemaError(f"decoder.num_heads: {heads} does not divide decoder.width {width}")
        patch = enc.get("patch_size", PATCH)
        if d["input_size"] % patch:
            raise SchemaError(f"input_size: {d['input_size']} is not a multiple of encoder.patch_size {patch}")
        bad = [i for i in enc["intermediate_layers"] if i >= enc["depth"]]
        if bad:
            raise SchemaError(f"encoder.intermediate_layers: {bad[0]} is not a block of a depth-{enc['depth']} encoder")
        params = estimate_params(d)
        if params > MAX_PARAMS:
            raise SchemaError(f"encoder/decoder sizes: about {params:.2g} parameters, over the limit of {MAX_PARAMS:.0g}")
    except SchemaError as e:
        raise SchemaError(f"invalid {where}: {e}") from None


def snap_to_patch(size: int, patch: int = PATCH) -> int:
    """Largest multiple of the patch not above the paper's nominal size (1024 -> 1022)."""
    return size // patch * patch


VITS = ViTConfig("vits", embed_dim=384, depth=12, num_heads=6, intermediate_layers=(2, 5, 8, 11))
VITB = ViTConfig("vitb", embed_dim=768, depth=12, num_heads=12, intermediate_layers=(2, 5, 8, 11))
VITL = ViTConfig("vitl", embed_dim=1024, depth=24, num_heads=16, intermediate_layers=(4, 11, 17, 23))
DPT_S = DPTConfig(features=64, out_channels=(48, 96, 192, 384))
DPT_B = DPTConfig(features=128, out_channels=(96, 192, 384, 768))
DPT_L = DPTConfig(features=256, out_channels=(256, 512, 1024, 1024))

# Head size 32 (ViT) and 16 (decoder): multiples of 8, >= 16, so TensorRT can fuse attention.
TINY_VIT = ViTConfig(
    "tiny", embed_dim=128, depth=4, num_heads=4, intermediate_layers=(0, 1, 2, 3), pretrained_grid=20
)

PRESETS: dict[str, OISConfig] = {
    # 280 px (20x20 tokens) with a narrow DPT (24 features) rather than 224 px with 32: in equal
    # training time both reach the same accuracy early on, and the finer grid is what small
    # objects lack (docs/model-card-ois-tiny.md).
    "ois-tiny": OISConfig(
        "ois-tiny",
        280,
        TINY_VIT,
        DPTConfig(features=24, out_channels=(24, 48, 96, 128), output_at_fusion_grid=True),
        # Click disks of 5.5 px: at 280 px the default 5 px @ 1024 would be a 1.4 px disk, a few
        # of the 196 pixels its 14x14 patch embedding sees, too weak a signal to learn from quickly.
        # mask_prompts: the clicks and previous mask reach the 80x80 mask head directly, so later
        # clicks can fix detail below a token (model card, training history). pixel_stem: 16 channels
        # of pixel-level features in the mask head's finest skip (model card, training history).
        # token_skip: the prompt-updated tokens reach the mask head at the token grid, not only at
        # half of it (model card, training history).
        DecoderConfig(
            width=64, num_heads=4, disk_radius_at_1024=20.0, mask_prompts=True, pixel_stem=16, token_skip=True
        ),
    ),
    "ois-s-1024": OISConfig("ois-s-1024", snap_to_patch(1024), VITS, DPT_S),
    "ois-b-1024": OISConfig("ois-b-1024", snap_to_patch(1024), VITB, DPT_B),
    "ois-b-2048": OISConfig("ois-b-2048", snap_to_patch(2048), VITB, DPT_B),
    "ois-l-1024": OISConfig("ois-l-1024", snap_to_patch(1024), VITL, DPT_L),
}

# Depth Anything V2 family -> the preset its official weights fill by default.
DEFAULT_PRESET_FOR_VARIANT = {"vits": "ois-s-1024", "vitb": "ois-b-1024", "vitl": "ois-l-1024"}


def get_preset(name: str) -> OISConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
