"""Shape profiles of the engines: which input shapes an engine is built for.

The decoder has two: interactive (P = 1, N = 1..max clicks) and SAT (P = 1..max prompts,
N = 1). Our TensorRT engines keep both and pick one per call; ONNX Runtime's TensorRT provider
takes one profile per input, so it gets their union.
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


def select_profile(prompts: int, clicks: int, max_clicks: int, max_prompts: int) -> int:
    """Which decoder profile serves a call of P prompt sets with N clicks each."""
    if prompts == 1 and clicks <= max_clicks:
        return INTERACTIVE
    if clicks == 1 and prompts <= max_prompts:
        return SAT
    raise UserError(
        f"no engine profile for {prompts} prompt sets of {clicks} clicks: the engines serve P=1 with N<={max_clicks}, "
        f"or P<={max_prompts} with N=1 (ois-deploy build --max-clicks/--max-prompts)"
    )


def union_profile(profiles: list[dict[str, tuple[Shape, Shape, Shape]]]) -> dict[str, tuple[Shape, Shape, Shape]]:
    """One profile covering all given ones: elementwise min of the minima and max of the
    maxima; the first profile's optimum (interactive use is what the latency goal is about)."""
    merged = {}
    for name, (lo, opt, hi) in profiles[0].items():
        lows = [p[name][0] for p in profiles]
        highs = [p[name][2] for p in profiles]
        merged[name] = (tuple(map(min, *lows)), opt, tuple(map(max, *highs)))
    return merged
