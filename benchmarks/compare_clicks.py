"""Paired comparison of two models on the same objects, from their `ois-deploy eval --save-clicks`
files: per-object differences of NoC@85/90/95 and IoU after 1, 5 and 10 clicks, with a 95%
bootstrap interval over objects (resampled in pairs), and how many objects each model did better on;
the JSON also gives each model's own mean with its interval over the same resamples.
One run per model says little when the means differ by a few hundredths; pairing the objects
shows whether a difference is larger than the object-to-object spread (docs/model-card-ois-tiny.md, the ablation).

    python benchmarks/compare_clicks.py A.clicks.jsonl B.clicks.jsonl [--labels A B] [--json OUT]
"""

from __future__ import annotations

import argparse

import numpy as np

from ois_deploy.errors import UserError, run_script
from ois_deploy.evaluate.metrics import ObjectResult, noc_per_object, read_clicks
from ois_deploy.io import write_json
from ois_deploy.provenance import machine_info, now_utc, tool_versions

IOU_AFTER = (1, 5, 10)


def per_object(results: list[ObjectResult], max_clicks: int) -> dict[str, np.ndarray]:
    """Each metric's value per object; NoC as the evaluation counts it (max_clicks when never reached)."""
    metrics = {f"NoC@{key}": np.array(nocs, float) for key, nocs in noc_per_object(results, max_clicks).items()}
    for k in IOU_AFTER:
        if k <= max_clicks:
            metrics[f"IoU@{k}"] = np.array([r.ious[k - 1] for r in results])
    return metrics


def paired(a: np.ndarray, b: np.ndarray, lower_is_better: bool, resamples: int, seed: int) -> dict:
    diff = b - a
    rng = np.random.default_rng(seed)
    rows = rng.integers(len(diff), size=(resamples, len(diff)))
    means = diff[rows].mean(axis=1)
    interval = lambda m: [round(float(v), 4) for v in np.percentile(m, [2.5, 97.5])]  # noqa: E731
    b_better = diff < 0 if lower_is_better else diff > 0
    a_better = diff > 0 if lower_is_better else diff < 0
    return {"a": round(float(a.mean()), 4), "b": round(float(b.mean()), 4), "b_minus_a": round(float(diff.mean()), 4),
            "ci95": interval(means),
            # each model's own mean over the same resamples: how far the set's objects pin it down
            "a_ci95": interval(a[rows].mean(axis=1)), "b_ci95": interval(b[rows].mean(axis=1)),
            "b_better": int(b_better.sum()), "a_better": int(a_better.sum()), "equal": int((diff == 0).sum())}


def compare(a: list[ObjectResult], b: list[ObjectResult], resamples: int = 10_000, seed: int = 0) -> dict:
    by_name = {r.name: r for r in b}
    if len(by_name) != len(b) or sorted(by_name) != sorted(r.name for r in a):
        raise UserError("the two files do not hold the same objects: compare evals of the same dataset")
    b = [by_name[r.name] for r in a]
    max_clicks = min(len(r.ious) for r in a + b)
    ma, mb = per_object(a, max_clicks), per_object(b, max_clicks)
    return {name: paired(ma[name], mb[name], name.startswith("NoC"), resamples, seed) for name in ma}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="clicks JSON lines of model A (eval --save-clicks)")
    parser.add_argument("b", help="clicks JSON lines of model B, same dataset")
    parser.add_argument("--labels", nargs=2, default=["A", "B"], metavar=("A", "B"))
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0, help="seeds the bootstrap")
    parser.add_argument("--json", help="write the comparison here")
    args = parser.parse_args()
    if args.resamples < 100:
        raise UserError("--resamples must be at least 100")

    a, b = read_clicks(args.a), read_clicks(args.b)
    metrics = compare(a, b, args.resamples, args.seed)
    label_a, label_b = args.labels
    print(f"{len(a)} objects; {label_b} minus {label_a}, 95% bootstrap interval; objects each did better on")
    for name, m in metrics.items():
        print(f"{name:7} {m['a']:7.3f} {m['b']:7.3f}  {m['b_minus_a']:+.3f} [{m['ci95'][0]:+.3f}, {m['ci95'][1]:+.3f}]"
              f"  {label_b} {m['b_better']}, {label_a} {m['a_better']}, equal {m['equal']}")
    if args.json:
        write_json({"a": {"label": label_a, "clicks_file": args.a}, "b": {"label": label_b, "clicks_file": args.b},
                    "objects": len(a), "resamples": args.resamples, "seed": args.seed, "metrics": metrics,
                    "machine": machine_info(), "versions": tool_versions(), "date": now_utc()}, args.json)


if __name__ == "__main__":
    run_script(main)
