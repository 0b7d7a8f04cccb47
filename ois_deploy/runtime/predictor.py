"""Interactive predictor: set an image once, then click; the previous mask is fed back.

The click logic (geometry, click coordinates, previous-mask feedback, resizing to the image) has
one code path for every backend: `encode_image` and `decode_clicks`, the two steps, also for
callers that keep image states themselves (the HTTP service). Its array work runs where the
runner keeps it (Runner.encode_frame, Runner.decode_to_image): on the host, or on the device for
the PyTorch family.
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np

from ..errors import UserError
from .base import Runner
from .preprocess import DEFAULT_MAX_PIXELS, Frame, as_rgb
from .registry import RunnerSpec, default_backend, open_runner

Click = tuple[float, float, bool]  # (x column, y row) in original image pixels, positive


class Prediction(NamedTuple):
    mask: np.ndarray  # bool [H,W] at the original image size
    logits: np.ndarray | None  # float32 [H,W]; None where decode_clicks was asked for the mask only


class Encoded(NamedTuple):
    """One image's encoder state and its geometry."""

    state: object
    frame: Frame


def encode_image(runner: Runner, image: np.ndarray) -> Encoded:
    """HxW, HxWx3 or HxWx4 uint8 of any size -> the image state and its frame."""
    image = as_rgb(image)
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise UserError(f"image must be at least 1x1, got {image.shape[1]}x{image.shape[0]}")
    frame = Frame(image.shape[0], image.shape[1], runner.cfg.input_size)
    return Encoded(runner.encode_frame(image, frame), frame)


def empty_prev(runner: Runner):
    """The previous mask before the first click, where the runner keeps it."""
    return runner.empty_prev()


def decode_clicks(runner: Runner, encoded: Encoded, clicks: list[Click], prev, threshold: float = 0.5,
                  with_logits: bool = True) -> tuple[Prediction, object]:
    """Decode all clicks so far from the previous-mask probability `prev` ([1,1,S,S] in the input
    frame, as empty_prev or this function gave it); returns the prediction at the image's size
    and the probability to feed back next. The mask is made without a float array of the image's
    size; with_logits=False also skips the float logits at that size (Prediction.logits None)."""
    frame = encoded.frame
    coords = frame.to_input(np.array([[x, y] for x, y, _ in clicks], np.float32))[None]
    labels = np.array([[1 if p else 0 for _, _, p in clicks]], np.int32)
    mask, logits, prev = runner.decode_to_image(encoded.state, frame, coords, labels, prev, threshold, with_logits)
    return Prediction(mask, logits), prev


class Predictor:
    """One interactive session over a runner: one image, its clicks, the fed-back mask.

    A Predictor holds one session and is not to be shared between threads; open one per user.
    Its runner may be shared by several Predictors across threads where `runner.thread_safe`
    (ONNX Runtime, PyTorch on the CPU).

    max_image_pixels: set_image refuses larger images (read_image checks files the same way,
    from the header, before decoding)."""

    def __init__(self, runner: Runner, max_image_pixels: int = DEFAULT_MAX_PIXELS):
        self.runner = runner
        self.max_image_pixels = max_image_pixels
        self.cfg = runner.cfg
        self.backend = runner.name
        self.notes = runner.notes
        self.frame: Frame | None = None
        self._encoded: Encoded | None = None
        self.reset()

    @classmethod
    def open(cls, model: str = "ois-tiny", backend: str | None = None, precision: str = "fp32",
             checkpoint: str | None = None, device: str | None = None, threads: int = 0,
             order_attention: str | None = None, max_image_pixels: int = DEFAULT_MAX_PIXELS,
             profile: bool = False, int8_decoder: str = "qdq") -> "Predictor":
        """A Predictor for MODEL, a preset name (torch backends) or an export folder (any backend;
        default ort). device: torch cpu/cuda; ort auto/cpu/cuda/tensorrt. precision fp32 or fp16.
        order_attention: override of the model's order-attention mode (torch backends). profile:
        collect the runtime's per-node times (openvino, ort; Runner.profile_decode). int8_decoder:
        qdq or nncf (openvino int8; RunnerSpec)."""
        spec = RunnerSpec(backend or default_backend(str(model)), str(model), precision, checkpoint, device, threads,
                          order_attention, profile=profile, int8_decoder=int8_decoder)
        return cls(open_runner(spec), max_image_pixels)

    @property
    def max_clicks(self) -> int:
        return self.cfg.decoder.max_clicks

    def set_image(self, image: np.ndarray) -> None:
        """HxW, HxWx3 or HxWx4 uint8 up to max_image_pixels. Encodes once; clears the clicks."""
        shape = np.shape(image)
        if len(shape) >= 2 and shape[0] * shape[1] > self.max_image_pixels:
            raise UserError(f"image is {shape[1]}x{shape[0]} = {shape[0] * shape[1]:,} pixels, "
                            f"over the limit of {self.max_image_pixels:,}")
        self._encoded = encode_image(self.runner, image)
        self.frame = self._encoded.frame
        self.reset()

    def reset(self) -> None:
        """Forget clicks and previous mask; keep the image."""
        self.clicks: list[Click] = []
        self._prev = empty_prev(self.runner)

    def click(self, x: float, y: float, positive: bool = True, threshold: float = 0.5,
              with_logits: bool = True) -> Prediction:
        """Add a click at column x, row y (original image pixels) and predict with all clicks so far.
        The mask is probability > threshold (the evaluation protocol uses 0.49); with_logits=False
        leaves Prediction.logits None (no float array of the image's size)."""
        self._require_image()
        self.frame.check_click(x, y)
        if len(self.clicks) >= self.max_clicks:
            raise UserError(f"at most {self.max_clicks} clicks per object")
        self.clicks.append((float(x), float(y), bool(positive)))
        prediction, self._prev = decode_clicks(self.runner, self._encoded, self.clicks, self._prev, threshold,
                                               with_logits)
        return prediction

    def predict(self, clicks: list[Click], prev_mask: np.ndarray | None = None) -> Prediction:
        """Stateless: clicks (x, y, positive) in original pixels, prev_mask an optional [H,W]
        probability (float, finite, in [0, 1])."""
        self._require_image()
        if not 1 <= len(clicks) <= self.max_clicks:
            raise UserError(f"give between 1 and {self.max_clicks} clicks, got {len(clicks)}")
        for x, y, _ in clicks:
            self.frame.check_click(x, y)
        prev = self.runner.empty_prev()
        if prev_mask is not None:
            prev_mask = np.asarray(prev_mask)
            if prev_mask.shape != (self.frame.height, self.frame.width):
                raise UserError(f"prev_mask must be {self.frame.height}x{self.frame.width}, got {prev_mask.shape}")
            if prev_mask.dtype.kind != "f" or not np.isfinite(prev_mask).all() or prev_mask.min() < 0 or prev_mask.max() > 1:
                raise UserError("prev_mask must be a finite float probability in [0, 1]")
            h, w = self.frame.resized
            fitted = np.zeros((1, 1, self.cfg.input_size, self.cfg.input_size), np.float32)
            fitted[0, 0, :h, :w] = cv2.resize(prev_mask.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
            prev = self.runner.prev_from_numpy(fitted)
        return decode_clicks(self.runner, self._encoded, list(clicks), prev)[0]

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> "Predictor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _require_image(self) -> None:
        if self._encoded is None:
            raise UserError("call set_image() before clicking")
