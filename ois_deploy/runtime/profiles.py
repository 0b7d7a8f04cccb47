"""Shape profiles of the engines: which input shapes an engine is built for.

The decoder has two: interactive (P = 1, N = 1..max clicks) and SAT (P = 1..max prompts,
N = 1). Our TensorRT engines keep both and pick one per call; ONNX Runtime's TensorRT provider
parses several profiles but runs only its first (docs/design.md §3.2), so it gets one decoder
session per profile. Batches that neither serves are split over them (batching.py).
"""

from __future__ import annotations

from ..errors import UserError
from ..contract import DECODER_INPUTS, state_shapes
from ..presets import OISConfig

INTERACTIVE, SAT = 0, 1  # decoder profile indices

Shape = tuple[int, ...]


def encoder_profile(cfg: OISConfig) -> dict[str, tuple[Shape, Shape, Shape]]:
    s = cfg.input_size
    one = (1, 3, s, s)
    return {"image": (one, one, one)}


def decoder_profiles(cfg: OISConfig, max_clicks: int, max_prompts: int) -> list[dict[str, tuple[Shape, Shape, Shape]]]:
    """[interactive, SAT]: (min, opt, max) shape per decoder input."""
    if not 1 <= max_clicks <= cfg.decoder.max_clicks:
        raise UserError(f"--max-clicks must be 1..{cfg.decoder.max_clicks}")
    if not 1 <= max_prompts <= 256:
        raise UserError("--max-prompts must be 1..256")
    s = cfg.input_size
    fixed = {name: (shape, shape, shape) for name, shape in state_shapes(cfg).items()}
    opt_clicks = min(8, max_clicks)
    interactive = {
        **fixed,
        "point_coords": ((1, 1, 2), (1, opt_clicks, 2), (1, max_clicks, 2)),
        "point_labels": ((1, 1), (1, opt_clicks), (1, max_clicks)),
        "prev_mask": ((1, 1, s, s),) * 3,
    }
    sat = {
        **fixed,
        "point_coords": ((1, 1, 2), (max_prompts, 1, 2), (max_prompts, 1, 2)),
        "point_labels": ((1, 1), (max_prompts, 1), (max_prompts, 1)),
        "prev_mask": ((1, 1, s, s), (max_prompts, 1, s, s), (max_prompts, 1, s, s)),
    }
    assert set(interactive) == set(DECODER_INPUTS)
    return [interactive, sat]
