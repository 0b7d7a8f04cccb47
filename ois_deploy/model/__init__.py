"""The OIS reference model in PyTorch."""

from .ois import OIS, ImageState, count_parameters
from .presets import PRESETS, DecoderConfig, DPTConfig, OISConfig, ViTConfig, get_preset

__all__ = [
    "OIS",
    "ImageState",
    "count_parameters",
    "PRESETS",
    "OISConfig",
    "ViTConfig",
    "DPTConfig",
    "DecoderConfig",
    "get_preset",
]
