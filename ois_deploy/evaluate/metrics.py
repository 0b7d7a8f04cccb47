"""Interactive evaluation metrics (docs/design.md §6, the SegNext/RITM protocol): sessions of
the simulated user (clicker.py) on any backend, NoC, NoF, mIoU@k, seconds per click, and
task-level parity of two backends over the same objects. Every object gets all its clicks (no
early stop), so NoC and mIoU@k come from one run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..runtime.preprocess import DEFAULT_MAX_PIXELS
from .clicker import PRED_THRESHOLD, Click, Clicker

IOU_THRESHOLDS = (0.85, 0.90, 0.95)


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    pred, gt = pred.astype(bool), gt.astype(bool)
    union = (pred | gt).sum()
    return 1.0 if union == 0 else float((pred & gt).sum() / union)


@dataclass
class ObjectResult:
    name: str
    clicks: list[Click] = field(default_factory=list)
    ious: list[float] = field(default_factory=list)
    decode_seconds: list[float] = field(default_factory=list)
    encode_seconds: float = 0.0

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "clicks": [{"x": c.x, "y": c.y, "positive": c.positive, "iou": round(i, 6)} for c, i in zip(self.clicks, self.ious)],
        }


def read_clicks(path: str | Path) -> list[ObjectResult]:
    """The sessions of `eval --save-clicks` (ObjectResult.to_json per line); no timings are stored."""
    results = []
    try:
        for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
            try:
                record = json.loads(line)
                clicks = [Click(int(c["x"]), int(c["y"]), bool(c["positive"])) for c in record["clicks"]]
                ious = [float(c["iou"]) for c in record["clicks"]]
                results.append(ObjectResult(str(record["name"]), clicks, ious, decode_seconds=[0.0] * len(ious)))
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{path}: line {number} is not an eval --save-clicks record ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read clicks file {path}: {e.strerror if isinstance(e, OSError) else e}") from None
    if not results:
        raise UserError(f"{path}: no sessions in it")
    return results


def run_object(predictor, image: np.ndarray, gt: np.ndarray, name: str, max_clicks: int = 20) -> ObjectResult:
    """One simulated session: `predictor` is an ois_deploy.Predictor (any backend)."""
    result = ObjectResult(name)
    start = time.perf_counter()
    predictor.set_image(image)
    result.encode_seconds = time.perf_counter() - start
    clicker = Clicker(gt)
    pred = np.zeros(gt.shape, bool)
    for _ in range(max_clicks):
        click = clicker.next_click(pred)
        start = time.perf_counter()
        prediction = predictor.click(click.x, click.y, click.positive, threshold=PRED_THRESHOLD, with_logits=False)
        result.decode_seconds.append(time.perf_counter() - start)
        pred = prediction.mask
        result.clicks.append(click)
        result.ious.append(iou(pred, gt))
    return result


def noc(ious: list[float], threshold: float, max_clicks: int) -> int:
    """Clicks needed to reach IoU >= threshold; max_clicks if never."""
    for k, value in enumerate(ious[:max_clicks], start=1):
        if value >= threshold:
            return k
    return max_clicks


def noc_per_object(results: list[ObjectResult], max_clicks: int) -> dict[str, list[int]]:
    """Each object's NoC at each threshold, keyed "85", "90", "95" as in NoC@85."""
    return {f"{round(t * 100)}": [noc(r.ious, t, max_clicks) for r in results] for t in IOU_THRESHOLDS}


def summarise(results: list[ObjectResult], max_clicks: int = 20) -> dict:
    """NoC@85/90/95, NoF@85/90/95, mIoU@k (k = 1..max_clicks) and seconds per click."""
    if not results:
        return {}
    summary = {}
    for key, nocs in noc_per_object(results, max_clicks).items():
        summary[f"NoC@{key}"] = float(np.mean(nocs))
        summary[f"NoF@{key}"] = int(sum(n >= max_clicks for n in nocs))  # as RITM/SegNext count it
    curves = np.array([r.ious[:max_clicks] for r in results])
    summary["mIoU@k"] = [float(v) for v in curves.mean(axis=0)]
    # SPC: wall time per click with the encoder amortised over the clicks of its image.
    total = sum(r.encode_seconds + sum(r.decode_seconds) for r in results)
    clicks = sum(len(r.decode_seconds) for r in results)
    summary["spc_ms"] = 1000 * total / clicks
    summary["decoder_ms"] = 1000 * sum(sum(r.decode_seconds) for r in results) / clicks
    return summary


def evaluate_samples(predictor, samples, max_clicks: int, progress=None, max_image_pixels: int = DEFAULT_MAX_PIXELS,
                     skipped: list | None = None) -> list[ObjectResult]:
    """One session per sample (datasets.Sample); progress() after each object. An object whose
    ground truth is empty has nothing to click on: it is skipped (its name appended to `skipped`)."""
    results = []
    for sample in samples:
        image, gt = sample.load(max_image_pixels)
        if not gt.any():
            if skipped is not None:
                skipped.append(sample.name)
        else:
            results.append(run_object(predictor, image, gt, sample.name, max_clicks))
        if progress:
            progress()
    return results


def task_parity(results: list[ObjectResult], others: list[ObjectResult], max_clicks: int) -> dict:
    """Two backends' sessions over the same objects: identical click sequences, the largest
    per-click IoU difference, and each side's NoC@90."""
    same = [[(c.x, c.y, c.positive) for c in a.clicks] == [(c.x, c.y, c.positive) for c in b.clicks]
            for a, b in zip(results, others)]
    return {
        "identical_click_sequences": int(sum(same)),
        "objects": len(same),
        "max_iou_difference": float(max(abs(x - y) for a, b in zip(results, others) for x, y in zip(a.ious, b.ious))),
        "NoC@90": (summarise(results, max_clicks)["NoC@90"], summarise(others, max_clicks)["NoC@90"]),
    }
