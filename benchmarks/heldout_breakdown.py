"""Held-out results by shape, by object size and by the number of visible pieces, from
`ois-deploy eval --save-clicks` of a set written by `ois-deploy scenes`: each object's shape,
area and mask are recovered by regenerating its scene from the seed (names are sceneNNNN_objK).

Each group also reports its mask-grid ceiling: the mean IoU of the true mask after it has
passed through the model's mask-logit grid and the host-side resize, the best any prediction
at that grid can score. It tells resolution losses apart from the model's own errors.

    python benchmarks/heldout_breakdown.py CLICKS.jsonl --seed 0 --json OUT.json
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import cv2
import numpy as np

from ois_deploy.errors import UserError, run_script
from ois_deploy.evaluate.metrics import ObjectResult, iou, read_clicks, summarise
from ois_deploy.io import write_json
from ois_deploy.model import get_preset
from ois_deploy.runtime.preprocess import Frame, fit_to_frame, logits_to_image, logits_to_input_frame
from ois_deploy.provenance import machine_info, now_utc, tool_versions
from ois_deploy.train.scenes import heldout_scene

SIZE_BUCKETS = ((0.0, 0.03, "under 3%"), (0.03, 0.10, "3-10%"), (0.10, 1.01, "10% and over"))
PIECE_SHARE = 0.02  # a connected part holding less of the object's pixels is a speck, not a piece


def pieces(mask: np.ndarray) -> int:
    """Visible pieces of an object: 8-connected parts with at least PIECE_SHARE of its pixels
    (occluders cut an object into several)."""
    _, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    return int((areas >= PIECE_SHARE * max(1, areas.sum())).sum())


def grid_ceiling(mask: np.ndarray, input_size: int, mask_size: int) -> float:
    """IoU of the mask after the model's grid: area-resampled to the mask-logit grid, as sharp
    logits, resized back like a prediction (preprocess.logits_to_image)."""
    frame = Frame(mask.shape[0], mask.shape[1], input_size)
    cells = cv2.resize(fit_to_frame(mask.astype(np.float32), frame), (mask_size, mask_size), interpolation=cv2.INTER_AREA)
    return iou(logits_to_image(logits_to_input_frame(20.0 * (cells - 0.5), input_size), frame) > 0, mask)


def brief(rows: list[tuple[ObjectResult, float]]) -> dict:
    """The evaluation's own summary (docs/design.md §6), reduced to the figures compared here, and the
    group's mask-grid ceiling (mean, and how many objects cannot reach 90% at that grid).
    rows: (result, ceiling) per object."""
    results, ceilings = [r for r, _ in rows], np.array([c for _, c in rows])
    s = summarise(results, max_clicks=len(results[0].ious))
    return {"objects": len(results), "mIoU@1": round(s["mIoU@k"][0], 4), "mIoU@5": round(s["mIoU@k"][4], 4),
            "NoC@90": round(s["NoC@90"], 2), "grid_ceiling_mIoU": round(float(ceilings.mean()), 4),
            "grid_ceiling_under_90": int((ceilings < 0.9).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("clicks", help="JSON lines from eval --save-clicks")
    parser.add_argument("--seed", type=int, default=0, help="the --seed the held-out set was written with")
    parser.add_argument("--preset", default="ois-tiny", help="the model's preset, for the mask-grid ceiling")
    parser.add_argument("--json", help="write the breakdown here")
    args = parser.parse_args()
    cfg = get_preset(args.preset)

    rows, scenes = [], {}
    for result in read_clicks(args.clicks):
        name = re.fullmatch(r"scene(\d+)_obj(\d+)", result.name)
        if not name:
            raise UserError(f"{args.clicks}: {result.name} is not a name written by `ois-deploy scenes`")
        index, k = map(int, name.groups())
        if index not in scenes:
            scenes[index] = heldout_scene(args.seed, index)
        scene = scenes[index]
        if k >= len(scene.masks):
            raise UserError(f"{result.name}: scene {index} of seed {args.seed} has no object {k} (another --seed?)")
        mask = scene.masks[k]
        ceiling = grid_ceiling(mask, cfg.input_size, cfg.mask_size)
        rows.append((scene.shapes[k], float(mask.mean()), pieces(mask), (result, ceiling)))

    by_shape, by_pieces = defaultdict(list), defaultdict(list)
    for shape, _, n, r in rows:
        by_shape[shape].append(r)
        by_pieces["one piece" if n == 1 else "several pieces"].append(r)
    result = {
        "clicks_file": args.clicks,
        "preset": cfg.name,
        "all": brief([r for *_, r in rows]),
        "by_shape": {shape: brief(group) for shape, group in sorted(by_shape.items())},
        "by_area": {name: brief([r for _, a, _, r in rows if lo <= a < hi]) for lo, hi, name in SIZE_BUCKETS},
        "by_pieces": {name: brief(by_pieces[name]) for name in ("one piece", "several pieces") if by_pieces[name]},
        "machine": machine_info(),
        "versions": tool_versions(),
        "date": now_utc(),
    }
    for section in ("by_shape", "by_area", "by_pieces"):
        for name, s in result[section].items():
            print(f"{section[3:]:6} {name:14} n={s['objects']:3}  mIoU@1 {s['mIoU@1']:.3f}  mIoU@5 {s['mIoU@5']:.3f}  "
                  f"NoC@90 {s['NoC@90']:5.2f}  grid ceiling {s['grid_ceiling_mIoU']:.3f} ({s['grid_ceiling_under_90']} under 0.9)")
    if args.json:
        write_json(result, args.json)  # atomic, like every other results file


if __name__ == "__main__":
    run_script(main)
