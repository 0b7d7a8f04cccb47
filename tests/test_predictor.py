"""The interactive predictor: any image size and layout, clicks in original pixels, feedback."""

import numpy as np
import pytest
import torch

from ois_deploy import Predictor, UserError
from ois_deploy.model import get_preset
from ois_deploy.runtime.preprocess import Frame, sigmoid, to_input

S = get_preset("ois-tiny").input_size  # ois-tiny's square input side


@pytest.fixture(scope="module")
def predictor():
    return Predictor.open("ois-tiny")


@pytest.mark.parametrize("shape", [(170, 300, 3), (300, 170, 3), (224, 224, 3), (50, 400, 3), (900, 640, 3)])
def test_masks_come_back_at_the_original_size(predictor, shape, rng):
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    predictor.set_image(image)
    result = predictor.click(shape[1] - 1, shape[0] - 1, True)  # the far corner is inside
    assert result.mask.shape == shape[:2] and result.mask.dtype == bool
    assert result.logits.shape == shape[:2] and np.isfinite(result.logits).all()
    assert ((result.logits > 0) == result.mask).all()


def test_grayscale_and_rgba_are_converted(predictor, rng):
    gray = rng.integers(0, 256, (120, 200), dtype=np.uint8)
    predictor.set_image(gray)
    a = predictor.click(50, 60).logits
    predictor.set_image(np.dstack([gray, gray, gray, np.full_like(gray, 255)]))
    b = predictor.click(50, 60).logits
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_frame_geometry():
    frame = Frame(height=100, width=200, size=224)
    assert frame.scale == pytest.approx(1.12)
    assert frame.resized == (112, 224)
    np.testing.assert_allclose(frame.to_input(np.array([[0, 0], [199, 99]])), [[0.06, 0.06], [222.94, 110.94]], atol=1e-4)
    image, _ = to_input(np.full((100, 200, 3), 200, np.uint8), 224)
    assert image.shape == (1, 3, 224, 224)
    assert (image[0, :, :112] == 200).all() and (image[0, :, 112:] == 0).all()  # padded bottom with black


def test_previous_mask_is_fed_back(predictor, rng):
    """The second click's decode sees sigmoid(first logits) in the input frame, zero in the padding."""
    image = rng.integers(0, 256, (150, S, 3), dtype=np.uint8)  # already S wide: not resized
    predictor.set_image(image)
    predictor.click(100, 70, True)
    prev = torch.as_tensor(predictor._prev).numpy().copy()  # the fed-back probability, wherever the runner keeps it
    second = predictor.click(20, 30, False)

    model = predictor.runner.model
    with torch.no_grad():
        state = model.encode(torch.from_numpy(to_input(image, S)[0]))
        coords = torch.from_numpy(predictor.frame.to_input(np.array([[100, 70], [20, 30]], np.float32))[None])
        expected = model.decode(state, coords, torch.tensor([[1, 0]]), torch.from_numpy(prev))
        without = model.decode(state, coords, torch.tensor([[1, 0]]), torch.zeros_like(torch.from_numpy(prev)))
    got = predictor.predict([(100, 70, True), (20, 30, False)], prev_mask=None).logits
    assert prev[0, 0, 150:].max() == 0  # the padded rows of the input frame
    assert 0 < prev[0, 0, :150].min() and prev.max() < 1
    assert not np.allclose(second.logits, got)  # feedback made a difference
    import cv2

    lo = cv2.resize(expected[0, 0].numpy(), (S, S), interpolation=cv2.INTER_LINEAR)[:150]
    np.testing.assert_allclose(second.logits, lo, atol=1e-4)
    lo_without = cv2.resize(without[0, 0].numpy(), (S, S), interpolation=cv2.INTER_LINEAR)[:150]
    np.testing.assert_allclose(got, lo_without, atol=1e-4)


def test_reset_starts_over(predictor, rng):
    predictor.set_image(rng.integers(0, 256, (100, 100, 3), dtype=np.uint8))
    first = predictor.click(40, 40).logits
    predictor.click(10, 10, False)
    predictor.reset()
    assert predictor.clicks == [] and predictor._prev.max() == 0
    np.testing.assert_allclose(predictor.click(40, 40).logits, first)


def test_bad_clicks_and_images(predictor, rng):
    predictor.set_image(rng.integers(0, 256, (100, 120, 3), dtype=np.uint8))
    for x, y in [(-1, 5), (120, 5), (5, 100), (5, -0.5)]:
        with pytest.raises(UserError, match="outside the 120x100 image"):
            predictor.click(x, y)
    with pytest.raises(UserError, match="uint8"):
        predictor.set_image(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(UserError, match="HxW"):
        predictor.set_image(np.zeros((10, 10, 2), np.uint8))
    predictor.reset()
    for i in range(predictor.max_clicks):
        predictor.click(i, i, i % 2 == 0)
    with pytest.raises(UserError, match="at most 24 clicks"):
        predictor.click(50, 50)


def test_clicking_before_an_image_is_an_error():
    with pytest.raises(UserError, match="set_image"):
        Predictor.open("ois-tiny").click(1, 1)


def test_unknown_backend():
    with pytest.raises(UserError, match="unknown backend"):
        Predictor.open("ois-tiny", backend="nope")


def test_sigmoid_is_stable():
    assert np.isfinite(sigmoid(np.array([-1e6, 0.0, 1e6]))).all()
