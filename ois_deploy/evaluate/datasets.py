"""Evaluation datasets: one object per (image, mask) pair, paired by file stem.

Layouts, detected from the folder given:
- DAVIS-345 (SegNext): `img/*.jpg` + `gt/*.png`;
- HQSeg44K validation sets as HQ-SAM and SegNext distribute them, given their parent folder
  (`DIS5K/DIS-VD/{im,gt}`, `thin_object_detection/ThinObject5K/{images_test,masks_test}`,
  `thin_object_detection/COIFT/{images,masks}`, `thin_object_detection/HRSOD/{images,masks_max255}`)
  or one of those set folders itself;
- generic: `images/` + `masks/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..errors import UserError
from ..runtime.preprocess import DEFAULT_MAX_PIXELS, read_image

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# (layout name, image folder, mask folder), most specific first
LAYOUTS = (
    ("davis", "img", "gt"),
    ("dis-vd", "im", "gt"),
    ("thinobject5k-te", "images_test", "masks_test"),
    ("hrsod", "images", "masks_max255"),
    ("generic", "images", "masks"),
)
HQSEG44K_VAL = {
    "DIS-VD": "DIS5K/DIS-VD",
    "ThinObject5K-TE": "thin_object_detection/ThinObject5K",
    "COIFT": "thin_object_detection/COIFT",
    "HRSOD": "thin_object_detection/HRSOD",
}


@dataclass(frozen=True)
class Sample:
    name: str
    image_path: Path
    mask_path: Path

    def load(self, max_image_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, np.ndarray]:
        """(RGB image as displayed, bool mask); images over max_image_pixels are refused unread."""
        image = read_image(self.image_path, max_image_pixels)
        mask = read_mask(self.mask_path)
        if mask.shape != image.shape[:2]:
            raise UserError(f"mask {self.mask_path} is {mask.shape[1]}x{mask.shape[0]}, its image "
                            f"{image.shape[1]}x{image.shape[0]}")
        return image, mask


def read_mask(path: Path) -> np.ndarray:
    data = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if data is None:
        raise UserError(f"cannot read mask {path}")
    return data > (0 if data.max() <= 1 else 127)  # 0/1 and 0/255 masks (anti-aliased edges too)


def _files(folder: Path, exts) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in exts}


def _pair(images_dir: Path, masks_dir: Path, prefix: str = "") -> list[Sample]:
    images, masks = _files(images_dir, IMAGE_EXTS), _files(masks_dir, IMAGE_EXTS)
    unpaired = sorted(str(images[s]) for s in images.keys() - masks.keys())
    unpaired += sorted(str(masks[s]) for s in masks.keys() - images.keys())
    if unpaired:
        shown = ", ".join(unpaired[:5]) + (f" and {len(unpaired) - 5} more" if len(unpaired) > 5 else "")
        raise UserError(f"{len(unpaired)} files without a partner (image/mask stems must match): {shown}")
    return [Sample(prefix + stem, images[stem], masks[stem]) for stem in sorted(images)]


def _layout(folder: Path) -> tuple[str, Path, Path] | None:
    for name, images, masks in LAYOUTS:
        if (folder / images).is_dir() and (folder / masks).is_dir():
            return name, folder / images, folder / masks
    return None


def load_dataset(path: str | Path) -> tuple[str, list[Sample]]:
    """(layout name, samples) of a dataset folder; a one-line error if it is none of the layouts."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"dataset folder not found: {folder}")
    hq = {name: folder / sub for name, sub in HQSEG44K_VAL.items() if (folder / sub).is_dir()}
    if hq:
        samples = []
        for name, sub in hq.items():
            found = _layout(sub)
            if found is None:
                raise UserError(f"{sub} has none of the expected image/mask folders")
            samples += _pair(found[1], found[2], prefix=f"{name}/")
        return "hqseg44k-val", _nonempty(samples, folder)
    found = _layout(folder)
    if found is None:
        expected = "; ".join(f"{i}/ + {m}/" for _, i, m in LAYOUTS)
        raise UserError(f"{folder} is not a dataset folder: expected {expected}, or the HQSeg44K parent folder")
    return found[0], _nonempty(_pair(found[1], found[2]), folder)


def _nonempty(samples: list[Sample], folder: Path) -> list[Sample]:
    if not samples:
        raise UserError(f"no image/mask pairs in {folder}")
    return samples
