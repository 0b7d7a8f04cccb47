"""Mask encodings of the HTTP API: COCO uncompressed RLE, base64 PNG, polygons.

RLE is COCO's uncompressed form, as `pycocotools.mask.frPyObjects` reads it: `counts` are run
lengths over the mask flattened column-major (Fortran order), starting with a run of background
(0 when the first pixel is foreground).
"""

from __future__ import annotations

import base64

import cv2
import numpy as np

FORMATS = ("rle", "png", "polygons")


def rle_encode(mask: np.ndarray) -> dict:
    """bool [H,W] -> {"size": [H, W], "counts": [...]}."""
    flat = np.asarray(mask, bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def rle_decode(rle: dict) -> np.ndarray:
    """The inverse of rle_encode: bool [H,W]."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], np.int64)
    values = np.arange(len(counts)) % 2 == 1  # runs alternate background, foreground
    flat = np.repeat(values, counts)
    if flat.size != h * w:
        raise ValueError(f"RLE counts sum to {flat.size}, not {h}x{w}")
    return flat.reshape((w, h)).T


def png_encode(mask: np.ndarray) -> str:
    """bool [H,W] -> base64 of a one-channel PNG, 0 or 255."""
    ok, data = cv2.imencode(".png", np.asarray(mask, np.uint8) * 255)
    assert ok
    return base64.b64encode(data.tobytes()).decode("ascii")


def polygons_encode(mask: np.ndarray) -> list[list[int]]:
    """bool [H,W] -> outer boundaries as [[x0, y0, x1, y1, ...], ...] (OpenCV contours, pixel
    centres). Holes are not represented: use rle for the exact mask."""
    contours, _ = cv2.findContours(np.asarray(mask, np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1).astype(int).tolist() for c in contours if len(c) >= 3]


def encode_mask(mask: np.ndarray, fmt: str):
    return {"rle": rle_encode, "png": png_encode, "polygons": polygons_encode}[fmt](mask)
