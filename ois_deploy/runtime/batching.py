"""Decoder batches over fixed shape profiles (TensorRT engines, ONNX Runtime's TensorRT provider).

Such a decoder is built for two shape ranges only (profiles.py): interactive (P = 1 prompt set,
N = 1..max clicks) and SAT (P = 1..max prompts, N = 1 click each). Any other batch is split over
the profile that fits and the logits are put back together in order: prompt sets are independent
(each has its own clicks and previous mask; the image state is shared), so P can be split freely,
while the clicks of one prompt set attend to each other and N cannot. Pure Python: the backend
passes its own one-call decoder and the concatenation of its arrays (numpy or torch).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..errors import UserError
from .profiles import INTERACTIVE, SAT

Call = tuple[slice, int]  # (prompt sets of the call, profile index)


def plan_calls(prompts: int, clicks: int, max_clicks: int, max_prompts: int) -> list[Call]:
    """The decoder calls that serve P prompt sets of N clicks each, in prompt-set order."""
    if prompts < 1 or clicks < 1:
        raise UserError(f"a decoder call needs at least one prompt set and one click, not P={prompts}, N={clicks}")
    if clicks > max_clicks:
        raise UserError(f"{clicks} clicks in one prompt set, but the engines take at most {max_clicks} "
                        "(ois-deploy build --max-clicks)")
    if prompts == 1:
        return [(slice(0, 1), INTERACTIVE)]
    if clicks == 1:  # SAT: whole chunks of the SAT profile
        return [(slice(p, min(p + max_prompts, prompts)), SAT) for p in range(0, prompts, max_prompts)]
    return [(slice(p, p + 1), INTERACTIVE) for p in range(prompts)]


def split_decode(decode: Callable[[Any, Any, Any, int], Any], coords, labels, prev_mask, max_clicks: int,
                 max_prompts: int, concat: Callable = np.concatenate):
    """decode(coords, labels, prev_mask, profile) over the calls plan_calls gives; their logits
    [p,1,S',S'] joined along P by concat. One call is returned as it came."""
    calls = plan_calls(coords.shape[0], coords.shape[1], max_clicks, max_prompts)
    if len(calls) == 1:
        return decode(coords, labels, prev_mask, calls[0][1])
    return concat([decode(coords[part], labels[part], prev_mask[part], profile) for part, profile in calls])
