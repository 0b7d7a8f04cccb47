"""The simulated user of the interactive protocol (docs/design.md §6, SegNext/RITM).

Next click: FN = gt & ~pred, FP = ~gt & pred; L2 distance transform of each, padded by 1;
already clicked pixels excluded; positive at the FN maximum when it exceeds the FP maximum,
else negative at the FP maximum. The first click (empty prediction) is the interior-most point
of the object. Prediction = probability > 0.49, and the probability is fed back as prev_mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

PRED_THRESHOLD = 0.49


@dataclass
class Click:
    x: int  # column, original image pixels
    y: int  # row
    positive: bool


class Clicker:
    """Simulated user for one object."""

    def __init__(self, gt: np.ndarray):
        self.gt = gt.astype(bool)
        self.not_clicked = np.ones_like(self.gt)

    def next_click(self, pred: np.ndarray) -> Click:
        pred = pred.astype(bool)
        fn = distance_to_border(self.gt & ~pred) * self.not_clicked
        fp = distance_to_border(~self.gt & pred) * self.not_clicked
        positive = fn.max() > fp.max()
        dist = fn if positive else fp
        y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)  # first maximum, row-major
        self.not_clicked[y, x] = False
        return Click(int(x), int(y), bool(positive))


def distance_to_border(region: np.ndarray) -> np.ndarray:
    """L2 distance of each region pixel to the nearest non-region pixel, the image border
    counting as outside (the padding by 1)."""
    padded = np.pad(region.astype(np.uint8), 1)
    return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
