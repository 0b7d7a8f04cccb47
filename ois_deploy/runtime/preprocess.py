"""Host-side image and mask geometry (docs/design.md §2.2, SAM convention).

The image is resized so its longest side is S (aspect kept), then padded bottom/right to SxS
with black. Normalisation happens inside the encoder. Masks come back at S'xS', are resized
to SxS, cropped to the resized image and resized to the original size.
"""

from __future__ import annotations

import threading
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


DEFAULT_MAX_PIXELS = 100_000_000
MAX_SIDE = 1_000_000  # libpng refuses a wider or taller image (its user limit), OpenCV one over 1 << 20
# Pillow's names of the formats read (MPO: a JPEG with more pictures after it, as phones write them).
FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG", "BMP": "BMP", "TIFF": "TIFF", "WEBP": "WebP"}
SUPPORTED = "PNG, JPEG, BMP, TIFF, WebP"


class ImageTooLarge(UserError):
    """An image over a size limit (pixels, side): the server answers 413, the CLI as any UserError."""


# EXIF orientation -> (transpose first, then np.rot90 quarter turns counter-clockwise, then flip left-right)
_ORIENTATIONS = {2: (False, 0, True), 3: (False, 2, False), 4: (False, 2, True), 5: (True, 0, False),
                 6: (False, 3, False), 7: (True, 2, False), 8: (False, 1, False)}


def image_header(data: bytes, name: str = "image") -> tuple[int, int, int]:
    """(width, height, EXIF orientation 1-8) from the file's header, without decoding pixels."""
    import io
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # the pixel limit is ours (decode_image): no bomb warning on stderr
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            # A PNG's eXIf chunk after the pixel data is found only by decoding them all (Pillow's
            # getexif loads the image): such an orientation is not read, the pixels stay unread.
            exif_read = img.format in ("JPEG", "MPO", "TIFF", "WEBP") or (img.format == "PNG" and "exif" in img.info)
            orientation = img.getexif().get(0x0112, 1) if exif_read else 1
            if img.format not in FORMATS:
                raise UserError(f"cannot read {name}: {img.format} images are not supported; use {SUPPORTED}")
            if max(img.width, img.height) > MAX_SIDE:
                raise ImageTooLarge(f"{name} is {img.width}x{img.height}: a side over {MAX_SIDE:,} pixels is too "
                                    f"{'wide' if img.width > MAX_SIDE else 'tall'} to decode")
            return img.width, img.height, orientation if orientation in range(1, 9) else 1
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{name} is too large to read safely: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise UserError(f"cannot read {name}: not a supported image file ({SUPPORTED})") from None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> np.ndarray:
    """Image file bytes -> RGB uint8 as an image viewer shows it (EXIF orientation applied;
    grayscale, 16-bit (its high byte) and RGBA (alpha dropped) converted). The pixel count is checked from the header before the
    pixels are decoded."""
    if not data:
        raise UserError(f"{name} is empty")
    width, height, orientation = image_header(data, name)
    if width * height > max_pixels:
        raise ImageTooLarge(f"{name} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}")
    if data[:2] == b"\xff\xd8" and not _jpeg_complete(data):
        raise UserError(f"cannot read {name}: the JPEG data is truncated")
    # Straight to 8-bit RGB in the decoder (16-bit samples keep their high byte, alpha and EXIF
    # rotation dropped there, the rotation applied below): the decoded image is 3 bytes a pixel
    # whatever the file holds, never a 16-bit RGBA copy (8 bytes a pixel) first.
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None or image.size == 0:
        raise UserError(f"cannot read {name}: the file is corrupt or truncated")
    if orientation in _ORIENTATIONS:
        transpose, turns, flip = _ORIENTATIONS[orientation]
        image = image.transpose(1, 0, 2) if transpose else image
        image = np.rot90(image, turns) if turns else image
        image = np.ascontiguousarray(image[:, ::-1] if flip else image)
    return image


def _jpeg_complete(data: bytes) -> bool:
    """Whether the JPEG that starts `data` reaches its end marker (EOI). Anything after it (a
    phone's motion-photo video, a vendor's trailer) is not the image's concern. OpenCV decodes a
    truncated JPEG without an error (grey below the cut), hence this walk over its segments."""
    i, n = 2, len(data)
    while i + 1 < n:
        if data[i] != 0xFF:
            return False  # not at a marker: corrupt
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
        elif marker == 0xD9:  # EOI
            return True
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
        else:
            if i + 4 > n:
                return False
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
            if marker == 0xDA:  # start of scan: entropy-coded data up to the next real marker
                while True:
                    i = data.find(b"\xff", i)
                    if i < 0 or i + 1 >= n:
                        return False
                    follower = data[i + 1]
                    if follower == 0 or 0xD0 <= follower <= 0xD7:  # stuffed 0xFF, restart marker
                        i += 2
                    elif follower == 0xFF:
                        i += 1
                    else:
                        break
    return False


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as RGB uint8, as decode_image does."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read image {path}: {e.strerror}") from None
    return decode_image(data, max_pixels, name=f"image {path}")


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


_scratch = threading.local()


def scratch(key: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 work array of this thread for `key`, reused from call to call (contents left
    from the last use). A fresh array of megabytes pays a page fault per 4 KiB page each time it
    is first written, which cost more than the arithmetic on it: a click's host loop at S = 1022
    made ~6,000 faults (~25 ms in a VM, as long as a fifth of the decoder). Only for arrays that
    never leave the function that asked; per thread, as a runner may be shared by threads; at
    most the input frame and a few strips (STRIP_ELEMENTS) per thread are kept."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    size = int(np.prod(shape))
    if key not in buffers or buffers[key].size < size:
        buffers[key] = np.empty(size, np.float32)
    return buffers[key][:size].reshape(shape)


def logits_to_input_frame(logits: np.ndarray, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """mask logits [S',S'] -> [S,S] (bilinear), into `out` where given."""
    return cv2.resize(logits.astype(np.float32, copy=False), (size, size), dst=out, interpolation=cv2.INTER_LINEAR)


def logits_to_image(logits_sxs: np.ndarray, frame: Frame) -> np.ndarray:
    """logits [S,S] in the input frame -> [H,W] of the original image."""
    h, w = frame.resized
    return cv2.resize(logits_sxs[:h, :w], (frame.width, frame.height), interpolation=cv2.INTER_LINEAR)


def logit_cut(threshold: float) -> float:
    """The logit above which a pixel is in the mask: probability > threshold."""
    return float(np.log(threshold / (1 - threshold)))


def feedback(logits_sxs: np.ndarray, frame: Frame) -> np.ndarray:
    """Probability fed back as the next prev_mask [1,1,S,S]; the padding outside the image is zero.
    A new array (the caller keeps it), computed in place: no temporaries of its size."""
    prob = np.zeros((1, 1, *logits_sxs.shape), np.float32)
    h, w = frame.resized
    sigmoid(logits_sxs[:h, :w], out=prob[0, 0, :h, :w])
    return prob


# Output elements per strip when a mask is made at the image's size: bounds the float temporaries
# (4 MiB each) whatever the image's size.
STRIP_ELEMENTS = 1 << 20


def bilinear_rows(start: int, stop: int, src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows i0, i1 and weight of i1 for output rows start..stop of a bilinear resize from
    src to dst rows, pixel centres aligned (cv2 INTER_LINEAR, torch align_corners=False)."""
    y = np.maximum((np.arange(start, stop) + 0.5) * (src / dst) - 0.5, 0)
    i0 = np.minimum(np.floor(y).astype(np.int64), src - 1)
    return i0, np.minimum(i0 + 1, src - 1), (y - i0).astype(np.float32)


def strips(frame: Frame, elements: int = STRIP_ELEMENTS) -> range:
    """Start rows of the strips of at most `elements` values a mask of the image's size is made in."""
    return range(0, frame.height, max(1, elements // frame.width))


def mask_to_image(logits_sxs: np.ndarray, frame: Frame, cut: float) -> np.ndarray:
    """logits [S,S] in the input frame -> bool mask [H,W] (logit > cut), made in row strips so
    that no float array of the image's size exists; the same bilinear geometry as logits_to_image
    (rows interpolated first, then columns: equal up to float rounding). The strips' arrays are
    this thread's scratch arrays, reused from click to click."""
    h, w = frame.resized
    crop = logits_sxs[:h, :w]
    mask = np.empty((frame.height, frame.width), bool)
    rows_at = strips(frame)
    for start in rows_at:
        stop = min(start + rows_at.step, frame.height)
        i0, i1, a = bilinear_rows(start, stop, h, frame.height)
        # rows = crop[i0] + (crop[i1] - crop[i0]) * a, in place, then the columns
        rows, step = np.take(crop, i0, 0, scratch("rows", (stop - start, w))), np.take(crop, i1, 0, scratch("step", (stop - start, w)))
        np.subtract(step, rows, out=step)
        np.multiply(step, a[:, None], out=step)
        np.add(rows, step, out=rows)
        wide = cv2.resize(rows, (frame.width, stop - start), dst=scratch("wide", (stop - start, frame.width)),
                          interpolation=cv2.INTER_LINEAR)
        np.greater(wide, cut, out=mask[start:stop])
    return mask


def sigmoid(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """1 / (1 + exp(-x)), x clipped to [-60, 60]; in `out` where given, the same operations in place
    (no temporaries)."""
    if out is None:
        return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))
    np.clip(x, -60, 60, out=out)
    np.negative(out, out=out)
    np.exp(out, out=out)
    np.add(out, 1.0, out=out)
    return np.divide(1.0, out, out=out)
