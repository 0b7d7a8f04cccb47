"""Host-side image and mask geometry (docs/design.md §2.2, SAM convention).

The image is resized so its longest side is S (aspect kept), then padded bottom/right to SxS
with black. Normalisation happens inside the encoder. Masks come back at S'xS', are resized
to SxS, cropped to the resized image and resized to the original size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..errors import UserError


@dataclass(frozen=True)
class Frame:
    """Maps between original image pixels and the SxS input frame."""

    height: int
    width: int
    size: int  # S

    @property
    def scale(self) -> float:
        return self.size / max(self.height, self.width)

    @property
    def resized(self) -> tuple[int, int]:
        """(h, w) of the image inside the SxS frame."""
        return (max(1, round(self.height * self.scale)), max(1, round(self.width * self.scale)))

    def to_input(self, xy: np.ndarray) -> np.ndarray:
        """Pixel (x, y) of the original image -> (x, y) in the SxS frame (pixel centres kept)."""
        return np.clip((np.asarray(xy, np.float32) + 0.5) * self.scale - 0.5, 0, self.size - 1)

    def check_click(self, x: float, y: float) -> None:
        if not (0 <= x < self.width and 0 <= y < self.height):
            raise UserError(f"click ({x:g}, {y:g}) is outside the {self.width}x{self.height} image")


def as_rgb(image: np.ndarray) -> np.ndarray:
    """HxW, HxWx1, HxWx3 or HxWx4 uint8 -> HxWx3 uint8 RGB."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise UserError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 4:
        return np.ascontiguousarray(image[..., :3])
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise UserError(f"image must be HxW, HxWx3 or HxWx4, got shape {image.shape}")


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 (grayscale, 16-bit and RGBA converted)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image not found: {path}")
    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if data is None:
        raise UserError(f"cannot read image {path}: not a supported image file")
    if data.dtype == np.uint16:
        data = (data // 257).astype(np.uint8)
    if data.ndim == 3 and data.shape[2] == 4:
        data = cv2.cvtColor(data, cv2.COLOR_BGRA2RGBA)
    elif data.ndim == 3 and data.shape[2] == 3:
        data = cv2.cvtColor(data, cv2.COLOR_BGR2RGB)
    return as_rgb(data)


def fit_to_frame(array: np.ndarray, frame: Frame) -> np.ndarray:
    """HxW or HxWxC array of the original image -> float32 [S,S(,C)]: resized like the image
    (area when shrinking), padded bottom/right with zeros."""
    h, w = frame.resized
    interp = cv2.INTER_AREA if frame.scale < 1 else cv2.INTER_LINEAR
    canvas = np.zeros((frame.size, frame.size, *array.shape[2:]), np.float32)
    canvas[:h, :w] = cv2.resize(array, (w, h), interpolation=interp)
    return canvas


def to_input(image: np.ndarray, size: int) -> tuple[np.ndarray, Frame]:
    """RGB uint8 HxWx3 -> float32 [1,3,S,S] in 0..255, padded bottom/right with zeros."""
    frame = Frame(image.shape[0], image.shape[1], size)
    return fit_to_frame(image, frame).transpose(2, 0, 1)[None].copy(), frame


def logits_to_input_frame(logits: np.ndarray, size: int) -> np.ndarray:
    """mask logits [S',S'] -> [S,S] (bilinear)."""
    return cv2.resize(logits.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)


def logits_to_image(logits_sxs: np.ndarray, frame: Frame) -> np.ndarray:
    """logits [S,S] in the input frame -> [H,W] of the original image."""
    h, w = frame.resized
    return cv2.resize(logits_sxs[:h, :w], (frame.width, frame.height), interpolation=cv2.INTER_LINEAR)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))
