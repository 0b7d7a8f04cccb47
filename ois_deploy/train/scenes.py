"""Deterministic synthetic RGB-D scenes: textured shapes layered in a known depth order.

Each scene is a floor-like background and several objects painted back to front. Shapes are
convex (ellipse, box), concave (star, crescent), with holes (ring, perforated blob) or thin
(thick curves, frames). Depth is relative inverse depth (larger = nearer), consistent with the
painting order, with a gradient or a bulge inside each object. On purpose, some objects share
their neighbour's depth but not its look, and some share another object's texture at a different
depth, so that telling objects apart needs both appearance and depth order.

Scenes are made from a seed (an int, or a sequence of ints such as [stream, seed, index]), so
training data and held-out data are reproducible and disjoint. Used for the bundled images
(`python -m ois_deploy.synthetic demo.png --seed 7 --size 480x360`, and `scene_23.jpg` with
`--seed 23 --size 300x420 --objects 5`), for training (`ois_deploy.training`) and for held-out
evaluation sets in the DAVIS layout (`ois-deploy scenes`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

SHAPES = ("ellipse", "box", "star", "crescent", "ring", "perforated", "curve", "frame")
SAME_DEPTH_PROBABILITY = 0.35  # an object placed at almost its neighbour's depth
SAME_LOOK_PROBABILITY = 0.35  # an object given another object's texture
HELDOUT_STREAM = 2  # first seed word of held-out evaluation scenes (training uses 1)
HELDOUT_MIN_AREA = 0.01  # held-out objects cover at least this fraction of their image
HELDOUT_SIZES = (240, 480)  # longest side of held-out scenes, pixels


@dataclass
class Scene:
    image: np.ndarray  # [H,W,3] uint8 RGB
    depth: np.ndarray  # [H,W] float32 inverse depth (larger = nearer)
    masks: list[np.ndarray]  # visible [H,W] bool mask per object, back to front
    shapes: list[str]  # shape kind per object
    levels: list[float]  # base inverse depth per object (ascending: the painting order)
    looks: list[int]  # texture seed per object; equal seeds look alike


def _shape_mask(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    """One random shape of the given kind, sized relative to the image."""
    mask = np.zeros((h, w), np.uint8)
    side = min(h, w)
    cx, cy = int(rng.uniform(0.2, 0.8) * w), int(rng.uniform(0.2, 0.8) * h)
    a, b = (int(rng.uniform(0.1, 0.28) * side) for _ in range(2))
    angle = float(rng.uniform(0, 180))
    thick = max(3, int(rng.uniform(0.03, 0.06) * side))
    if kind == "ellipse":
        cv2.ellipse(mask, (cx, cy), (a, b), angle, 0, 360, 1, -1)
    elif kind == "box":
        box = cv2.boxPoints(((cx, cy), (2 * a, 2 * b), angle))
        cv2.fillPoly(mask, [box.astype(np.int32)], 1)
    elif kind == "star":
        n = int(rng.integers(5, 9))
        angles = np.sort(rng.uniform(0, 2 * np.pi, 2 * n))
        radii = np.where(np.arange(2 * n) % 2 == 0, 1.0, rng.uniform(0.3, 0.6, 2 * n))
        pts = np.stack([cx + a * radii * np.cos(angles), cy + b * radii * np.sin(angles)], 1)
        cv2.fillPoly(mask, [pts.astype(np.int32)], 1)
    elif kind == "crescent":
        r = max(a, b)
        cv2.circle(mask, (cx, cy), r, 1, -1)
        shift = rng.uniform(0.35, 0.6) * r
        theta = rng.uniform(0, 2 * np.pi)
        cv2.circle(mask, (int(cx + shift * np.cos(theta)), int(cy + shift * np.sin(theta))), int(0.85 * r), 0, -1)
    elif kind == "ring":
        r = max(a, b)
        cv2.circle(mask, (cx, cy), r, 1, -1)
        cv2.circle(mask, (cx, cy), int(r * rng.uniform(0.4, 0.65)), 0, -1)
    elif kind == "perforated":
        cv2.ellipse(mask, (cx, cy), (a, b), angle, 0, 360, 1, -1)
        for _ in range(int(rng.integers(1, 4))):
            hx, hy = cx + rng.uniform(-0.5, 0.5) * a, cy + rng.uniform(-0.5, 0.5) * b
            cv2.circle(mask, (int(hx), int(hy)), max(3, int(rng.uniform(0.12, 0.25) * min(a, b))), 0, -1)
    elif kind == "curve":  # a thick open curve through random control points
        t = np.linspace(0, 1, 40)[:, None]
        p = np.stack([rng.uniform(0.1, 0.9, 3) * w, rng.uniform(0.1, 0.9, 3) * h], 1)
        pts = (1 - t) ** 2 * p[0] + 2 * (1 - t) * t * p[1] + t**2 * p[2]
        cv2.polylines(mask, [pts.astype(np.int32)], False, 1, thick)
    elif kind == "frame":
        box = cv2.boxPoints(((cx, cy), (2 * a, 2 * b), angle))
        cv2.polylines(mask, [box.astype(np.int32)], True, 1, thick)
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return mask.astype(bool)


def _texture(rng: np.random.Generator, h: int, w: int, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Float32 texture of an HxW image, or of its rows y0:y1, columns x0:x1 only (box): a base
    colour with stripes, checks or blobs, plus sensor noise. The pattern is anchored to image
    coordinates, so two objects with the same look continue each other's pattern."""
    y0, y1, x0, x1 = box or (0, h, 0, w)
    base, second = rng.uniform(30, 225, 3).astype(np.float32), rng.uniform(30, 225, 3).astype(np.float32)
    ys, xs = np.arange(y0, y1, dtype=np.float32)[:, None], np.arange(x0, x1, dtype=np.float32)[None, :]
    kind = rng.integers(3)
    freq, phase = rng.uniform(0.03, 0.2), rng.uniform(0, 2 * np.pi)
    if kind == 0:
        pattern = 0.5 + 0.5 * np.sin(freq * (xs * np.cos(phase) + ys * np.sin(phase)))
    elif kind == 1:
        pattern = (np.sin(freq * xs + phase) * np.sin(freq * ys) > 0).astype(np.float32)
    else:
        coarse = rng.uniform(0, 1, (int(rng.integers(2, 7)),) * 2).astype(np.float32)
        pattern = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)[y0:y1, x0:x1]
    amount = np.float32(rng.uniform(0.1, 0.5))
    mix = base + (amount * pattern)[..., None] * (second - base)
    noise = rng.random((y1 - y0, x1 - x0, 3), dtype=np.float32) - np.float32(0.5)  # uniform: cheaper than normal
    return mix + noise * np.float32(20)


def _depth_levels(rng: np.random.Generator, objects: int) -> np.ndarray:
    """Inverse depth per object, ascending (back to front); some neighbours almost equal."""
    levels = np.sort(rng.uniform(0.35, 1.0, objects))
    for i in range(1, objects):
        if rng.uniform() < SAME_DEPTH_PROBABILITY:
            levels[i] = levels[i - 1] + rng.uniform(0.003, 0.02)
    return np.maximum.accumulate(levels)


def make_scene(seed: int | Sequence[int], height: int = 360, width: int = 480, objects: int = 4) -> Scene:
    rng = np.random.default_rng(seed)
    yy = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    xx = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :]
    rows, cols = np.arange(height, dtype=np.float32)[:, None], np.arange(width, dtype=np.float32)[None, :]
    looks = [int(rng.integers(2**31)) for _ in range(objects + 1)]
    image = _texture(np.random.default_rng(looks[0]), height, width) * 0.6  # a darker background
    depth = np.broadcast_to(0.1 + 0.2 * yy, (height, width)).astype(np.float32).copy()  # floor-like ramp
    owner = np.full((height, width), -1)
    kinds, used_looks = [], []
    levels = _depth_levels(rng, objects)
    for i, level in enumerate(levels):
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        shape = _shape_mask(rng, kind, height, width)
        look = looks[int(rng.integers(1, i + 1))] if i and rng.uniform() < SAME_LOOK_PROBABILITY else looks[i + 1]
        ys, xs = np.nonzero(shape)
        if len(ys):  # texture only the shape's bounding box: most of the generation time
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            region = shape[y0:y1, x0:x1]
            texture = _texture(np.random.default_rng(look), height, width, (y0, y1, x0, x1))
            image[y0:y1, x0:x1][region] = texture[region]
        gy, gx = rng.normal(0, 0.04, 2)  # a tilt, and a bulge for the solid shapes
        surface = level + gy * (yy - 0.5) + gx * xx
        if kind in ("ellipse", "star", "perforated") and len(ys):
            r2 = ((rows - ys.mean()) ** 2 + (cols - xs.mean()) ** 2) / min(height, width) ** 2
            surface = surface + 0.03 * np.exp(-r2 / 0.02)
        depth[shape] = np.broadcast_to(surface, (height, width))[shape]
        owner[shape] = i
        kinds.append(kind)
        used_looks.append(look)
    masks = [owner == i for i in range(objects)]
    return Scene(np.clip(image, 0, 255).astype(np.uint8), depth, masks, kinds, [float(v) for v in levels], used_looks)


def random_size(rng: np.random.Generator, long_sides: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a scene: longest side in long_sides (inclusive), aspect 0.6-1,
    portrait or landscape."""
    long_side = int(rng.integers(long_sides[0], long_sides[1] + 1))
    short_side = int(long_side * rng.uniform(0.6, 1.0))
    return (long_side, short_side) if rng.uniform() < 0.5 else (short_side, long_side)


def heldout_scene(seed: int, index: int) -> Scene:
    """Scene `index` of the held-out set with this seed (file names scene{index:04d}_obj{k})."""
    rng = np.random.default_rng([HELDOUT_STREAM, seed, index])
    h, w = random_size(rng, HELDOUT_SIZES)
    return make_scene([HELDOUT_STREAM, seed, index], h, w, int(rng.integers(3, 7)))


def write_davis(out: str | Path, count: int, seed: int = 0, min_area: float = HELDOUT_MIN_AREA, progress=None) -> int:
    """Held-out scenes in the DAVIS layout: img/NAME.jpg + gt/NAME.png, one pair per visible
    object covering at least min_area of its image. Returns the number of objects written."""
    out = Path(out)
    (out / "img").mkdir(parents=True, exist_ok=True)
    (out / "gt").mkdir(parents=True, exist_ok=True)
    written = 0
    for index in range(count):
        scene = heldout_scene(seed, index)
        bgr = cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR)
        for k, mask in enumerate(scene.masks):
            if mask.mean() < min_area:
                continue
            name = f"scene{index:04d}_obj{k}"
            cv2.imwrite(str(out / "img" / f"{name}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
            cv2.imwrite(str(out / "gt" / f"{name}.png"), mask.astype(np.uint8) * 255)
            written += 1
        if progress:
            progress()
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--size", default="480x360", help="WIDTHxHEIGHT")
    parser.add_argument("--objects", type=int, default=4)
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    scene = make_scene(args.seed, height, width, args.objects)
    params = [cv2.IMWRITE_JPEG_QUALITY, 90] if args.out.lower().endswith((".jpg", ".jpeg")) else []
    cv2.imwrite(args.out, cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR), params)


if __name__ == "__main__":
    main()
