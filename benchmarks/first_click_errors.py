"""How the first click's mask goes wrong on held-out scenes, by shape: precision (does it bleed
out of the object?), recall (does it cover the whole object?) and where its false positives land
(on other objects or on the background). The click is the evaluation's first click (docs/design.md §6);
the scenes are regenerated from the seed, as `ois-deploy scenes` writes them.

    python benchmarks/first_click_errors.py --seed 0 --count 60 --json OUT.json [--checkpoint CKPT]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
from rich.progress import track

from ois_deploy import Predictor
from ois_deploy.errors import run_script
from ois_deploy.evaluate.clicker import PRED_THRESHOLD, Clicker
from ois_deploy.io import write_json
from ois_deploy.provenance import machine_info, now_utc, tool_versions
from ois_deploy.train.scenes import HELDOUT_MIN_AREA, heldout_scene


def first_click_errors(predictor: Predictor, scene) -> list[tuple[str, dict]]:
    predictor.set_image(scene.image)
    rows = []
    for k, target in enumerate(scene.masks):
        if target.mean() < HELDOUT_MIN_AREA:  # as write_davis: not in the held-out set
            continue
        click = Clicker(target).next_click(np.zeros_like(target, dtype=bool))
        predictor.reset()
        pred = predictor.click(click.x, click.y, True, PRED_THRESHOLD).mask
        others = np.any([m for j, m in enumerate(scene.masks) if j != k], axis=0)
        inter, false_pos = (pred & target).sum(), pred & ~target
        rows.append((scene.shapes[k], {
            "precision": inter / max(pred.sum(), 1),
            "recall": inter / target.sum(),
            "iou": inter / (pred | target).sum(),
            "false_positives_on_other_objects": (false_pos & others).sum() / max(false_pos.sum(), 1),
        }))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="the --seed of `ois-deploy scenes`")
    parser.add_argument("--count", type=int, default=60, help="the --count of `ois-deploy scenes`")
    parser.add_argument("--checkpoint", help="default: the bundled ois-tiny weights")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    predictor = Predictor.open("ois-tiny", checkpoint=args.checkpoint)
    by_shape = defaultdict(list)
    for index in track(range(args.count), description="first clicks"):
        for shape, row in first_click_errors(predictor, heldout_scene(args.seed, index)):
            by_shape[shape].append(row)
    shapes = {
        shape: {"objects": len(rows), **{key: round(float(np.mean([r[key] for r in rows])), 4) for key in rows[0]}}
        for shape, rows in sorted(by_shape.items())
    }
    for shape, s in shapes.items():
        print(f"{shape:11} n={s['objects']:3}  precision {s['precision']:.2f}  recall {s['recall']:.2f}  "
              f"IoU {s['iou']:.2f}  false positives on other objects {s['false_positives_on_other_objects']:.2f}")
    result = {"checkpoint": args.checkpoint or "bundled", "seed": args.seed, "count": args.count, "by_shape": shapes,
              "machine": machine_info(), "versions": tool_versions(), "date": now_utc()}
    if args.json:
        write_json(result, args.json)


if __name__ == "__main__":
    run_script(main)
