"""Training settings, without torch: the `train` command's defaults come from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    seed: int = 0
    batch_size: int = 4  # scenes per step
    objects_per_scene: int = 4  # prompt sets per scene: one encoder pass feeds several decodes
    lr: float = 1e-3  # 5e-4 until the sixth version of the bundled weights (docs/model-card-ois-tiny.md)
    weight_decay: float = 0.05
    warmup_steps: int = 150
    max_extra_clicks: int = 3
    depth_weight: float = 1.0
    order_attention: str = "bias"  # "off" trains the paper's ablation
    scene_sizes: tuple[int, int] = (224, 400)  # longest side of generated scenes, before resizing to S
