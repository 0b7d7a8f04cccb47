"""Batch splitting over fixed decoder profiles (runtime/batching.py), which the TensorRT engines
and ONNX Runtime's TensorRT provider rely on, checked on the CPU around a real decoder: the
exported ois-tiny graphs in ONNX Runtime, whose dynamic axes take any (P, N) in one call, so the
split result can be compared with the unsplit one."""

import numpy as np
import pytest

from ois_deploy.errors import UserError
from ois_deploy.model import get_preset
from ois_deploy.runtime.batching import plan_calls, split_decode
from ois_deploy.runtime.profiles import INTERACTIVE, SAT

TINY = get_preset("ois-tiny")
S = TINY.input_size


def test_plan_calls_serves_every_batch_with_a_profile():
    assert plan_calls(1, 1, 24, 256) == [(slice(0, 1), INTERACTIVE)]
    assert plan_calls(1, 24, 24, 256) == [(slice(0, 1), INTERACTIVE)]
    assert plan_calls(256, 1, 24, 256) == [(slice(0, 256), SAT)]
    assert plan_calls(3, 24, 24, 256) == [(slice(p, p + 1), INTERACTIVE) for p in range(3)]
    assert plan_calls(16, 5, 24, 256) == [(slice(p, p + 1), INTERACTIVE) for p in range(16)]
    # engines built with --max-prompts 100: a 16x16 SAT grid in three chunks, the last one short
    assert plan_calls(256, 1, 24, 100) == [(slice(0, 100), SAT), (slice(100, 200), SAT), (slice(200, 256), SAT)]
    assert plan_calls(2, 1, 24, 1) == [(slice(0, 1), SAT), (slice(1, 2), SAT)]


def test_plan_calls_refuses_what_no_split_can_serve():
    with pytest.raises(UserError, match="9 clicks in one prompt set, but the engines take at most 8"):
        plan_calls(1, 9, 8, 256)  # the clicks of one prompt set attend to each other: never split
    with pytest.raises(UserError, match="9 clicks"):
        plan_calls(4, 9, 8, 256)
    with pytest.raises(UserError, match="P=0"):
        plan_calls(0, 1, 24, 256)


def batch(rng, prompts: int, clicks: int):
    labels = rng.choice(np.array([1, 0, -1], np.int32), size=(prompts, clicks))
    labels[:, 0] = 1
    coords = (rng.random((prompts, clicks, 2)) * (S - 1)).astype(np.float32)
    prev = rng.random((prompts, 1, S, S)).astype(np.float32)
    return coords, labels, prev


@pytest.fixture(scope="module")
def ort_decoder(tiny_export):
    from ois_deploy.runtime.ort_backend import OrtRunner

    runner = OrtRunner(tiny_export, "fp32", providers="cpu")
    image = np.random.default_rng(1).uniform(0, 255, (1, 3, S, S)).astype(np.float32)
    return runner, runner.encode(image)


@pytest.mark.parametrize("prompts, clicks, max_clicks, max_prompts", [
    (3, 24, 24, 256),  # verify's shapes, which neither profile serves
    (16, 5, 24, 256),
    (16, 1, 24, 6),  # SAT in chunks of 6, 6 and 4
    (1, 24, 24, 256),  # served as it is
])
def test_split_decode_matches_one_call(ort_decoder, prompts, clicks, max_clicks, max_prompts):
    runner, state = ort_decoder
    coords, labels, prev = batch(np.random.default_rng(prompts * 100 + clicks), prompts, clicks)
    calls = []

    def one_call(c, l, p, profile):
        # what an engine with these profiles would accept, checked on every call it is given
        if profile == INTERACTIVE:
            assert c.shape[0] == 1 and c.shape[1] <= max_clicks
        else:
            assert profile == SAT and c.shape[1] == 1 and c.shape[0] <= max_prompts
        assert len(c) == len(l) == len(p)
        calls.append(len(c))
        return runner.decode(state, c, l, p)

    split = split_decode(one_call, coords, labels, prev, max_clicks, max_prompts)
    whole = runner.decode(state, coords, labels, prev)
    assert split.shape == whole.shape == (prompts, 1, TINY.mask_size, TINY.mask_size)
    assert sum(calls) == prompts
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-5)
    # prompt sets differ, so a wrong order of reassembly would not pass the comparison above
    assert prompts == 1 or not np.allclose(whole[0], whole[-1])
