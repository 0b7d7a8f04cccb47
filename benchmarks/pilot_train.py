"""Pilot a change to ois-tiny before spending an hour on a full training run: train the preset
with some config fields replaced, for a few hundred steps, and score it on the first held-out
objects with few clicks (docs/model-card-ois-tiny.md).

    python benchmarks/pilot_train.py NAME --steps 500 [--set decoder.token_skip=false]
        [--set input_size=280 --set encoder.patch_size=10 --set encoder.pretrained_grid=28]
        [--train objects_per_scene=8] [--threads 1] [--objects 80] [--clicks 10]

--set FIELD=VALUE replaces a field of the model config, --train FIELD=VALUE one of the training
settings (training.TrainSettings); both take a JSON value (a list for a tuple field). Writes
artifacts/pilots/NAME (.safetensors, .log.jsonl, .eval.json); the held-out set is `ois-deploy scenes --out
artifacts/heldout --count 60 --seed 0`. Two pilots side by side take --threads 1 each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from ois_deploy import Predictor
from ois_deploy.evaluate.datasets import load_dataset
from ois_deploy.errors import UserError, run_script
from ois_deploy.evaluate.metrics import evaluate_samples, summarise
from ois_deploy.io import write_json
from ois_deploy.model import OISConfig, get_preset
from ois_deploy.provenance import machine_info, now_utc, tool_versions
from ois_deploy.train.loop import train
from ois_deploy.train.settings import TrainSettings


def parse_override(item: str, option: str) -> tuple[str, object]:
    field, sep, value = item.partition("=")
    if not sep:
        raise UserError(f"{option} {item!r}: expected FIELD=VALUE")
    try:
        return field, json.loads(value)
    except json.JSONDecodeError:
        raise UserError(f"{option} {item!r}: the value is not JSON") from None


def changed_config(overrides: list[str]) -> OISConfig:
    """ois-tiny with FIELD=VALUE pairs applied through the config's own (validating) from_dict."""
    config = get_preset("ois-tiny").to_dict()
    for item in overrides:
        field, value = parse_override(item, "--set")
        *parents, leaf = field.split(".")
        node = config
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise UserError(f"--set {item!r}: {field} is not a field of the ois-tiny config")
        node[leaf] = value
    try:
        return OISConfig.from_dict(config)
    except ValueError as e:  # __post_init__ checks (input size vs patch, ...)
        raise UserError(f"--set: {e}") from None


def changed_settings(steps: int, overrides: list[str]) -> TrainSettings:
    """Default training settings for `steps` with FIELD=VALUE pairs applied."""
    settings = TrainSettings(steps=steps)
    for item in overrides:
        field, value = parse_override(item, "--train")
        if field == "steps" or not hasattr(settings, field):
            raise UserError(f"--train {item!r}: {field} is not a training setting (steps has its own option)")
        default = getattr(settings, field)
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        if isinstance(default, float) and type(value) is int:
            value = float(value)
        if type(value) is not type(default):
            raise UserError(f"--train {item!r}: {field} takes a {type(default).__name__}")
        settings = dataclasses.replace(settings, **{field: value})
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="names the files under artifacts/pilots/")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--train", dest="train_overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--dataset", default="artifacts/heldout")
    parser.add_argument("--objects", type=int, default=80, help="score the first N held-out objects")
    parser.add_argument("--clicks", type=int, default=10)
    args = parser.parse_args()
    if min(args.objects, args.clicks, args.threads or 1) < 1:
        raise UserError("--objects, --clicks and --threads must be at least 1")

    config = changed_config(args.overrides)
    settings = changed_settings(args.steps, args.train_overrides)
    _, samples = load_dataset(args.dataset)  # fail before training, not after
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path("artifacts/pilots") / args.name
    out.parent.mkdir(parents=True, exist_ok=True)
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(f"train {args.name}", total=settings.steps)
        record = train(config, settings, f"{out}.safetensors", f"{out}.log.jsonl", lambda *_: bar.advance(task))
        predictor = Predictor.open("ois-tiny", checkpoint=f"{out}.safetensors")
        task = bar.add_task(f"eval {args.name}", total=args.objects)
        results = evaluate_samples(predictor, samples[: args.objects], args.clicks, lambda: bar.advance(task))
    summary = summarise(results, args.clicks)
    with open(f"{out}.log.jsonl") as log:
        last = [json.loads(line)["iou"] for line in log][-100:]
    report = {
        "name": args.name, "overrides": args.overrides, "train_overrides": args.train_overrides, "steps": args.steps,
        "train_seconds": record["seconds"],
        "train_iou_last_100_steps": sum(last) / len(last), "objects": len(results), "clicks": args.clicks,
        "mIoU@k": summary["mIoU@k"], "NoC@85": summary["NoC@85"], "NoC@90": summary["NoC@90"],
        "machine": machine_info(), "versions": tool_versions(), "date": now_utc(),
    }
    write_json(report, f"{out}.eval.json")
    miou = summary["mIoU@k"]
    k = min(5, len(miou))
    print(f"{args.name}: mIoU@1 {miou[0]:.3f} @{k} {miou[k - 1]:.3f} @{len(miou)} {miou[-1]:.3f}, "
          f"train IoU (last 100 steps) {report['train_iou_last_100_steps']:.3f}, {record['seconds']:.0f} s")


if __name__ == "__main__":
    run_script(main)
