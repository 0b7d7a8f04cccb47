"""The OIS reference model in PyTorch (configurations live in ois_deploy.presets, without torch)."""

from ..presets import PRESETS, DecoderConfig, DPTConfig, OISConfig, ViTConfig, get_preset
from .ois import OIS, ImageState, count_parameters

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
