"""Held-out results by shape and by object size, from `ois-deploy eval --save-clicks` of a set
written by `ois-deploy scenes`: each object's shape and area are recovered by regenerating its
scene from the seed (names are sceneNNNN_objK).

    python benchmarks/heldout_breakdown.py CLICKS.jsonl --seed 0 --json OUT.json
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

from ois_deploy.errors import UserError, run_script
from ois_deploy.evaluation import ObjectResult, read_clicks, summarise
from ois_deploy.io import write_json
from ois_deploy.provenance import machine_info, now_utc, tool_versions
from ois_deploy.synthetic import heldout_scene

SIZE_BUCKETS = ((0.0, 0.03, "under 3%"), (0.03, 0.10, "3-10%"), (0.10, 1.01, "10% and over"))


def brief(results: list[ObjectResult]) -> dict:
    """The evaluation's own summary (DESIGN §6), reduced to the figures compared here."""
    s = summarise(results, max_clicks=len(results[0].ious))
    return {"objects": len(results), "mIoU@1": round(s["mIoU@k"][0], 4), "mIoU@5": round(s["mIoU@k"][4], 4),
            "NoC@90": round(s["NoC@90"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("clicks", help="JSON lines from eval --save-clicks")
    parser.add_argument("--seed", type=int, default=0, help="the --seed the held-out set was written with")
    parser.add_argument("--json", help="write the breakdown here")
    args = parser.parse_args()

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
        rows.append((scene.shapes[k], float(scene.masks[k].mean()), result))

    by_shape = defaultdict(list)
    for shape, _, r in rows:
        by_shape[shape].append(r)
    result = {
        "clicks_file": args.clicks,
        "all": brief([r for _, _, r in rows]),
        "by_shape": {shape: brief(group) for shape, group in sorted(by_shape.items())},
        "by_area": {name: brief([r for _, a, r in rows if lo <= a < hi]) for lo, hi, name in SIZE_BUCKETS},
        "machine": machine_info(),
        "versions": tool_versions(),
        "date": now_utc(),
    }
    for section in ("by_shape", "by_area"):
        for name, s in result[section].items():
            print(f"{section[3:]:5} {name:13} n={s['objects']:3}  mIoU@1 {s['mIoU@1']:.3f}  mIoU@5 {s['mIoU@5']:.3f}  NoC@90 {s['NoC@90']:.2f}")
    if args.json:
        write_json(result, args.json)  # atomic, like every other results file


if __name__ == "__main__":
    run_script(main)
