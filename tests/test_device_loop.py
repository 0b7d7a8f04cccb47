"""The click loop on the device (TorchRunner, torch_geometry) against the host loop (Runner's own
methods, which ONNX Runtime, OpenVINO and TensorRT run), on the same ois-tiny model on the CPU;
the host loop's mask-only path; SAT's host memory."""

import tracemalloc

import numpy as np
import pytest
import torch

from ois_deploy.evaluate.bench import run_sat, sat_clicks
from ois_deploy.evaluate.metrics import iou
from ois_deploy.model.weights import load_model
from ois_deploy.runtime.base import Runner
from ois_deploy.runtime.predictor import decode_clicks, encode_image
from ois_deploy.runtime.preprocess import Frame, mask_to_image, read_image, to_input
from ois_deploy.runtime.torch_backend import TorchRunner
from ois_deploy.runtime.torch_geometry import fit_to_frame, to_image

DEMO = "ois_deploy/assets/demo.png"  # 480x360


class HostLoop(TorchRunner):
    """The same model with the click loop on the host: the base class's methods, unchanged."""

    encode_frame = Runner.encode_frame
    empty_prev = Runner.empty_prev
    prev_from_numpy = Runner.prev_from_numpy
    decode_to_image = Runner.decode_to_image
    decode_prompts = Runner.decode_prompts


@pytest.fixture(scope="module")
def runners():
    model = load_model("ois-tiny")[0]
    return TorchRunner(model), HostLoop(model)


def images():
    demo = read_image(DEMO)
    return {
        "demo (shrinks into S)": demo,
        "non-square, tall": np.ascontiguousarray(demo[:, 100:260]),  # 360x160
        "smaller than S": np.ascontiguousarray(demo[100:200, 150:300]),  # 100x150 < 280: grows
    }


def session(runner, image, clicks, with_logits=True):
    encoded = encode_image(runner, image)
    prev, out, seq = runner.empty_prev(), [], []
    for click in clicks:
        seq.append(click)
        prediction, prev = decode_clicks(runner, encoded, seq, prev, with_logits=with_logits)
        out.append((prediction, torch.as_tensor(prev).cpu().numpy().copy()))
    return out


def clicks_for(image):
    h, w = image.shape[:2]
    return [(w * 0.5, h * 0.5, True), (w * 0.2, h * 0.3, False), (w * 0.7, h * 0.6, True), (w * 0.4, h * 0.85, True),
            (w * 0.9, h * 0.1, False), (w * 0.3, h * 0.5, True), (w * 0.6, h * 0.2, False)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(images()))
def test_device_loop_gives_the_host_loops_masks(runners, name):
    device, host = runners
    image = images()[name]
    clicks = clicks_for(image)
    for k, ((d, d_prev), (h, h_prev)) in enumerate(zip(session(device, image, clicks), session(host, image, clicks))):
        assert d.mask.shape == image.shape[:2] and d.mask.dtype == bool
        assert d.mask.sum() > 0, f"click {k}: empty mask, nothing compared"
        assert iou(d.mask, h.mask) >= 0.999, f"click {k}"
        np.testing.assert_allclose(d.logits, h.logits, atol=1e-3)
        np.testing.assert_allclose(d_prev, h_prev, atol=1e-4)  # the feedback, zero in the padding alike


@pytest.mark.parametrize("shape", [(360, 480), (100, 150), (3000, 4000), (1, 500), (281, 280), (37, 50)])
def test_image_fitted_on_the_device_is_the_hosts(shape, rng):
    """Resize and pad in torch vs cv2: growing (bilinear) equal to the bit, shrinking (box filter)
    but for one grey level in a few pixels."""
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    host, frame = to_input(image, 280)
    diff = np.abs(fit_to_frame(torch.from_numpy(image), frame).numpy() - host)
    if frame.scale < 1:
        assert diff.max() <= 1 and (diff > 0).mean() < 0.02
    else:
        assert diff.max() == 0


@pytest.mark.parametrize("name", list(images()))
def test_masks_from_a_device_fitted_image(runners, name):
    device, host = runners
    image = images()[name]
    frame = Frame(*image.shape[:2], device.cfg.input_size)
    on_device = device.encode(fit_to_frame(torch.from_numpy(image), frame))
    on_host = host.encode_frame(image, frame)
    coords = frame.to_input(np.array([[c[0], c[1]] for c in clicks_for(image)[:3]], np.float32))[None]
    labels = np.array([[1, 0, 1]], np.int32)
    a = device.decode_to_image(on_device, frame, coords, labels, device.empty_prev())[0]
    b = device.decode_to_image(on_host, frame, coords, labels, device.empty_prev())[0]
    assert a.sum() > 0 and iou(a, b) >= 0.999


@pytest.mark.slow
def test_mask_only_decodes_give_the_same_masks(runners):
    """with_logits=False: no logits, and the masks (made in row strips) those of the full logits."""
    device, host = runners
    image = read_image(DEMO)
    for runner in (device, host):
        full, strips = session(runner, image, clicks_for(image)[:4]), session(runner, image, clicks_for(image)[:4], False)
        for (a, _), (b, _) in zip(full, strips):
            assert b.logits is None and iou(a.mask, b.mask) >= 0.999


@pytest.mark.parametrize("height, width", [(1500, 1100), (37, 2900)])
def test_strips_cover_the_image(rng, height, width):
    """Several strips (host: STRIP_ELEMENTS; torch: a small strip) against one full resize."""
    frame = Frame(height, width, 280)
    logits_sxs = rng.normal(size=(280, 280)).astype(np.float32)
    from ois_deploy.runtime.preprocess import logits_to_image

    full = logits_to_image(logits_sxs, frame) > 0.1
    assert (mask_to_image(logits_sxs, frame, 0.1) != full).mean() < 1e-4
    device, _ = to_image(torch.from_numpy(logits_sxs)[None, None], frame, 0.1, False, strip_elements=50_000)
    assert (device != full).mean() < 1e-4


def test_mask_only_decode_holds_no_full_size_float(runners):
    """A one-click mask on a 4000x4000 image: with logits the host loop holds H x W floats, without
    them only the bool mask and strips (tracemalloc counts numpy's and cv2's arrays)."""
    _, host = runners
    image = np.zeros((4000, 4000, 3), np.uint8)
    image[1000:3000, 1000:3000] = 200
    encoded = encode_image(host, image)
    peaks = {}
    for with_logits in (True, False):
        tracemalloc.start()
        prediction, _ = decode_clicks(host, encoded, [(2000, 2000, True)], host.empty_prev(), with_logits=with_logits)
        peaks[with_logits] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    pixels = 4000 * 4000
    assert peaks[True] > 5 * pixels  # bool mask + float32 logits: the measurement sees them
    assert peaks[False] < pixels + 24 * 2**20  # the bool mask, strips of 4 MiB, the SxS frame


def test_host_loop_results_are_its_own(runners):
    """The host loop reuses its work arrays (preprocess.scratch, per thread) from click to click:
    what a click returned stays as it was while other images' clicks run, here and in another
    thread, and a session gives the same results, bit for bit, whatever ran before it."""
    from concurrent.futures import ThreadPoolExecutor

    _, host = runners
    demo, tall, small = images().values()

    def raw_session(image):
        encoded, prev, out = encode_image(host, image), host.empty_prev(), []
        for k in range(1, 4):
            prediction, prev = decode_clicks(host, encoded, clicks_for(image)[:k], prev)
            out.append((prediction.mask, prediction.logits, prev))
        return out

    first = raw_session(demo)
    copies = [[np.array(a, copy=True) for a in click] for click in first]
    raw_session(tall)
    with ThreadPoolExecutor(1) as other:
        other.submit(raw_session, small).result()
    again = raw_session(demo)
    for kept, returned, repeated in zip(copies, first, again):
        for a, b, c in zip(kept, returned, repeated):
            assert np.array_equal(a, b) and np.array_equal(a, c)
    assert not np.array_equal(copies[0][2], copies[1][2])  # the feedback changed between clicks: compared something
    assert host.empty_prev().sum() == 0  # the shared empty mask was never written


@pytest.mark.slow
def test_sat_host_memory_does_not_grow_with_prompts(runners):
    """SAT through decode_prompts: the host's peak is the same for 16 and 64 prompt sets on the
    device loop and, once its empty mask for 64 exists (the warm-up run made it), on the host loop
    too; that mask is the runner's, of P x S x S floats, not a new one per call."""
    device, host = runners
    image, frame = to_input(read_image(DEMO), device.cfg.input_size)
    coords, s = sat_clicks(frame), device.cfg.input_size
    labels = np.ones((len(coords), 1), np.int32)

    def peak(runner, prompts):
        run_sat(runner, image, coords[:prompts], labels[:prompts], prompts)  # warm
        tracemalloc.start()
        run_sat(runner, image, coords[:prompts], labels[:prompts], prompts)
        value = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return value

    assert abs(peak(device, 64) - peak(device, 16)) < 2**20
    assert peak(device, 64) < 16 * s * s * 4  # less than the smaller host batch's empty mask
    assert abs(peak(host, 64) - peak(host, 16)) < 2**20
    assert host.empty_prev(64).shape == (64, 1, s, s) and np.shares_memory(host.empty_prev(16), host.empty_prev(64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(images()))
def test_gpu_loop_gives_the_host_loops_masks(runners, name):
    """On a GPU: the image fitted there, CUDA graphs, the loop there; against the CPU host loop."""
    import copy

    _, host = runners
    gpu = TorchRunner(copy.deepcopy(host.model), "cuda")
    image = images()[name]
    frame = Frame(*image.shape[:2], gpu.cfg.input_size)
    fitted = fit_to_frame(torch.from_numpy(image).cuda(), frame).cpu().numpy()
    assert np.abs(fitted - to_input(image, frame.size)[0]).max() <= 1
    clicks = clicks_for(image)
    for k, ((g, g_prev), (h, h_prev)) in enumerate(zip(session(gpu, image, clicks), session(host, image, clicks))):
        assert iou(g.mask, h.mask) >= 0.999, f"click {k}"
        np.testing.assert_allclose(g_prev, h_prev, atol=1e-3)
    assert gpu.graphs is not None and gpu.graphs.graphs  # the clicks ran from CUDA graphs
