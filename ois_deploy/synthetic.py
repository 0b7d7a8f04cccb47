"""Deterministic synthetic RGB-D scenes: textured shapes layered in a known depth order.

Used for the bundled demo image and for tests that need images with objects and masks.
The bundled images: `python -m ois_deploy.synthetic demo.png --seed 7 --size 480x360` and
`python -m ois_deploy.synthetic scene_23.jpg --seed 23 --size 300x420 --objects 5`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class Scene:
    image: np.ndarray  # [H,W,3] uint8 RGB
    depth: np.ndarray  # [H,W] float32 inverse depth (larger = nearer)
    masks: list[np.ndarray]  # visible [H,W] bool mask per object, back to front


def _shape_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One random filled shape: ellipse, rotated rectangle, ring or polygon."""
    mask = np.zeros((h, w), np.uint8)
    cx, cy = int(rng.uniform(0.2, 0.8) * w), int(rng.uniform(0.2, 0.8) * h)
    a, b = int(rng.uniform(0.08, 0.25) * w), int(rng.uniform(0.08, 0.25) * h)
    kind = rng.integers(4)
    if kind == 0:
        cv2.ellipse(mask, (cx, cy), (a, b), float(rng.uniform(0, 180)), 0, 360, 1, -1)
    elif kind == 1:
        box = cv2.boxPoints(((cx, cy), (2 * a, 2 * b), float(rng.uniform(0, 90))))
        cv2.fillPoly(mask, [box.astype(np.int32)], 1)
    elif kind == 2:
        cv2.circle(mask, (cx, cy), max(a, b), 1, -1)
        cv2.circle(mask, (cx, cy), max(a, b) // 2, 0, -1)  # a hole
    else:
        angles = np.sort(rng.uniform(0, 2 * np.pi, 7))
        radii = rng.uniform(0.4, 1.0, 7)
        pts = np.stack([cx + a * radii * np.cos(angles), cy + b * radii * np.sin(angles)], 1)
        cv2.fillPoly(mask, [pts.astype(np.int32)], 1)  # often concave
    return mask.astype(bool)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = rng.uniform(30, 225, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    freq, phase = rng.uniform(0.02, 0.15), rng.uniform(0, 2 * np.pi)
    stripes = np.sin(freq * (xx * np.cos(phase) + yy * np.sin(phase)))[..., None]
    noise = rng.normal(0, 8, (h, w, 3))
    return np.clip(base + 25 * stripes + noise, 0, 255)


def make_scene(seed: int, height: int = 360, width: int = 480, objects: int = 4) -> Scene:
    rng = np.random.default_rng(seed)
    yy = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    image = _texture(rng, height, width) * 0.6
    depth = np.broadcast_to(0.1 + 0.2 * yy, (height, width)).astype(np.float32).copy()  # floor-like ramp
    owner = np.full((height, width), -1)
    for i, level in enumerate(np.sort(rng.uniform(0.35, 1.0, objects))):  # back to front
        shape = _shape_mask(rng, height, width)
        image[shape] = _texture(rng, height, width)[shape]
        gy, gx = rng.normal(0, 0.05, 2)  # depth gradient inside the object
        ramp = level + gy * (yy - 0.5) + gx * np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :]
        depth[shape] = np.broadcast_to(ramp, (height, width))[shape]
        owner[shape] = i
    masks = [owner == i for i in range(objects)]
    return Scene(np.clip(image, 0, 255).astype(np.uint8), depth, masks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--size", default="480x360", help="WIDTHxHEIGHT")
    parser.add_argument("--objects", type=int, default=4)
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    scene = make_scene(args.seed, height, width, args.objects)
    cv2.imwrite(args.out, cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])


if __name__ == "__main__":
    main()
