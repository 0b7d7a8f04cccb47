"""The contract every backend keeps (runtime/base.py's Runner), one suite for all of them, on the
trained ois-tiny: two images' states never alias; any (P, N) up to the limits decodes and matches
the PyTorch FP32 reference within verify's tolerance for the precision; a runner marked
thread_safe gives the same masks from 4 threads; states round-trip through state_to_numpy /
state_from_numpy (also from another runner's encode); a device or provider other than the one
asked for is refused with one line.

CPU backends (ort, openvino, torch, aoti) run everywhere; the GPU ones (torch-cuda, ort-cuda,
ort-trt, trt) are marked and skip, naming what is missing, where it is.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import gpu_skip, has_cuda, has_tensorrt, ort_providers

from ois_deploy.contract import ENCODER_OUTPUTS, MAX_PROMPTS, state_shapes
from ois_deploy.errors import UserError
from ois_deploy.runtime.preprocess import read_image, to_input
from ois_deploy.runtime.registry import RunnerSpec, open_runner
from ois_deploy.verify import ASSETS, TOLERANCES

SHAPES = ((1, 1), (3, 24), (16, 5))  # (P, N): one click; 3 prompt sets at the click limit; 16 at 5
SAME = 1e-6  # relative L2 of "the same result": equal up to a GPU's reduction order

CASES = [
    pytest.param(("ort", "fp32"), id="ort-fp32"),
    pytest.param(("ort", "fp16"), id="ort-fp16"),
    pytest.param(("openvino", "fp32"), id="openvino-fp32"),
    pytest.param(("torch", "fp32"), id="torch-fp32"),
    pytest.param(("aoti", "fp32"), id="aoti-fp32", marks=pytest.mark.slow),  # builds the packages once per session
    pytest.param(("torch-cuda", "fp32"), id="torch-cuda-fp32", marks=pytest.mark.gpu),
    pytest.param(("torch-cuda", "fp16"), id="torch-cuda-fp16", marks=pytest.mark.gpu),
    pytest.param(("ort-cuda", "fp32"), id="ort-cuda-fp32", marks=pytest.mark.gpu),
    pytest.param(("ort-cuda", "fp16"), id="ort-cuda-fp16", marks=pytest.mark.gpu),
    pytest.param(("ort-trt", "fp16"), id="ort-trt-fp16", marks=[pytest.mark.gpu, pytest.mark.tensorrt]),
    pytest.param(("trt", "fp16"), id="trt-fp16", marks=[pytest.mark.gpu, pytest.mark.tensorrt]),
]
GPU_BACKENDS = ("torch-cuda", "ort-cuda", "ort-trt", "trt")


@pytest.fixture(scope="module")
def folder(tiny_export, tmp_path_factory):
    """A private copy of the export: the backends' caches (OpenVINO, ORT-TRT) land here."""
    copy = tmp_path_factory.mktemp("contract") / "ois-tiny"
    shutil.copytree(tiny_export, copy)
    return copy


@pytest.fixture(scope="module")
def images(folder):
    """Two bundled images in the model's input frame."""
    from ois_deploy.contract import manifest_config, read_manifest

    size = manifest_config(read_manifest(folder)).input_size
    return [to_input(read_image(ASSETS / name), size)[0] for name in ("demo.png", "scene_23.jpg")]


class Reference:
    """PyTorch FP32 on the CPU: its states of both images, and its decodes computed once per
    (image, P, N) for all backends."""

    def __init__(self, folder, images):
        self.runner = open_runner(RunnerSpec("torch", str(folder)))
        self.states = [self.runner.encode(image) for image in images]
        self.logits: dict[tuple, np.ndarray] = {}

    def decode(self, image: int, prompts: int, clicks: int, seed: int = 0) -> np.ndarray:
        key = (image, prompts, clicks, seed)
        if key not in self.logits:
            self.logits[key] = self.runner.decode(self.states[image], *click_inputs(self.runner.cfg, prompts, clicks, seed))
        return self.logits[key]


@pytest.fixture(scope="module")
def reference(folder, images):
    return Reference(folder, images)


@pytest.fixture(scope="module", params=CASES)
def runner(request, folder):
    backend, precision = request.param
    if backend in GPU_BACKENDS and (why := gpu_skip(backend)):
        pytest.skip(why)
    model = folder
    if backend == "aoti":
        model = request.getfixturevalue("aoti_export")
    elif backend == "trt":
        model = request.getfixturevalue("tmp_path_factory").mktemp("trt") / "ois-tiny"
        shutil.copytree(folder, model, ignore=shutil.ignore_patterns("openvino-cache", "ort-trt-cache"))
        from ois_deploy.export.tensorrt import build_engines

        build_engines(model, precision)
    opened = open_runner(RunnerSpec(backend, str(model), precision))
    assert opened.name == backend and opened.precision == precision
    assert opened.on_gpu == (backend in GPU_BACKENDS)
    yield opened
    opened.close()


def click_inputs(cfg, prompts: int, clicks: int, seed: int = 0):
    """Clicks as a session makes them: the first positive, then mixed, the last quarter padding
    (-1) when N > 3; a previous-mask probability per prompt set."""
    rng = np.random.default_rng([seed, prompts, clicks])
    s = cfg.input_size
    coords = (rng.random((prompts, clicks, 2)) * (s - 1)).astype(np.float32)
    labels = rng.integers(0, 2, (prompts, clicks)).astype(np.int32)
    labels[:, 0] = 1
    if clicks > 3:
        labels[:, clicks - clicks // 4:] = -1
    prev = rng.random((prompts, 1, s, s)).astype(np.float32)
    return coords, labels, prev


def rel_l2(got: np.ndarray, want: np.ndarray) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def test_states_of_two_images_never_alias(runner, images):
    clicks = click_inputs(runner.cfg, 1, 3)
    state_a = runner.encode(images[0])
    first = runner.decode(state_a, *clicks)
    state_b = runner.encode(images[1])
    other = runner.decode(state_b, *clicks)
    again = runner.decode(state_a, *clicks)
    assert rel_l2(other, first) > 0.05  # the images really differ, so aliasing would show
    assert rel_l2(again, first) <= SAME


@pytest.mark.parametrize("prompts, clicks", SHAPES, ids=[f"P{p}-N{n}" for p, n in SHAPES])
def test_any_prompt_and_click_count_matches_the_reference(runner, reference, images, prompts, clicks):
    assert clicks <= runner.cfg.decoder.max_clicks and prompts <= MAX_PROMPTS
    state = runner.encode(images[0])
    got = runner.decode(state, *click_inputs(runner.cfg, prompts, clicks))
    want = reference.decode(0, prompts, clicks)
    assert got.shape == want.shape == (prompts, 1, runner.cfg.mask_size, runner.cfg.mask_size)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert rel_l2(got, want) <= TOLERANCES[runner.precision]["rel_l2"]


def test_thread_safe_runner_gives_the_same_masks_from_4_threads(runner, images):
    if not runner.thread_safe:
        pytest.skip(f"{runner.name} on {runner.device} is not marked thread_safe")
    jobs = [(i % 2, click_inputs(runner.cfg, 1 + i % 3, 2 + i, seed=i)) for i in range(4)]  # all at once

    def run(job):
        image, clicks = job
        return runner.decode(runner.encode(images[image]), *clicks)

    alone = [run(job) for job in jobs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(run, jobs))
    for got, want in zip(together, alone):
        np.testing.assert_array_equal(got > 0, want > 0)
        assert rel_l2(got, want) <= SAME


def test_states_round_trip_through_numpy(runner, reference, images):
    clicks = click_inputs(runner.cfg, 2, 4)
    state = runner.encode(images[1])
    arrays = runner.state_to_numpy(state)
    assert list(arrays) == list(ENCODER_OUTPUTS)
    for name, shape in state_shapes(runner.cfg).items():
        assert isinstance(arrays[name], np.ndarray) and arrays[name].dtype == np.float32
        assert arrays[name].shape == (1, *shape[1:]), name
    assert rel_l2(runner.decode(runner.state_from_numpy(arrays), *clicks), runner.decode(state, *clicks)) <= SAME
    # a state another runner encoded (another process, a cache) decodes as that runner's would
    carried = runner.state_from_numpy(reference.runner.state_to_numpy(reference.states[1]))
    assert rel_l2(runner.decode(carried, *clicks), reference.decode(1, 2, 4)) <= TOLERANCES[runner.precision]["rel_l2"]


# -- asking for what is not there ----------------------------------------------------------------

def missing_cuda() -> str | None:
    return "a CUDA GPU is visible here" if has_cuda() else None


def missing_provider(provider: str) -> str | None:
    return f"onnxruntime here has {provider}" if provider in ort_providers() else None


def missing_trt() -> str | None:
    return "TensorRT and a CUDA GPU are here" if has_tensorrt() and has_cuda() else None


NOT_HERE = [  # backend, device asked for, why the refusal cannot be shown here (None: it can)
    ("ort", "cuda", lambda: missing_provider("CUDAExecutionProvider")),
    ("ort", "tensorrt", lambda: missing_provider("TensorrtExecutionProvider")),
    ("ort", "tpu", lambda: None),
    ("ort-cuda", None, lambda: missing_provider("CUDAExecutionProvider")),
    ("ort-trt", None, lambda: missing_provider("TensorrtExecutionProvider")),
    ("ort-cuda", "cpu", lambda: None),  # a GPU backend asked to run elsewhere
    ("torch", "cuda", missing_cuda),
    ("torch", "tpu", lambda: None),
    ("torch-cuda", None, missing_cuda),
    ("torch-cuda", "cpu", lambda: None),  # the CUDA backend asked to run elsewhere
    ("aoti", "cuda", missing_cuda),
    ("aoti", "tpu", lambda: None),
    ("openvino", "cuda", lambda: None),
    ("trt", None, missing_trt),
    ("trt", "cpu", lambda: None),
]


@pytest.mark.parametrize("backend, device, present", NOT_HERE, ids=[f"{b}-{d or 'default'}" for b, d, _ in NOT_HERE])
def test_a_device_or_provider_that_is_not_here_is_refused(folder, backend, device, present):
    if why := present():
        pytest.skip(f"{why}: nothing to refuse")
    with pytest.raises(UserError) as refused:
        open_runner(RunnerSpec(backend, str(folder), device=device))
    message = str(refused.value)
    assert message.strip() and "\n" not in message  # one line, naming the cause
    assert any(word in message for word in ("cuda", "CUDA", "tensorrt", "TensorRT", "tpu", "GPU", "CPU")), message
