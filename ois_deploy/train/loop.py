"""Training OIS on generated scenes, with the iterative protocol of RITM and SegNext.

Each step draws a batch of fresh scenes (`synthetic.make_scene`, seeded by [1, seed, step, i],
so training never sees a held-out scene), picks several objects per scene (their sessions share
one encoder pass: more mask supervision per second of CPU) and, for each:
1. places random initial clicks: 1-3 positives inside the object, 0-2 negatives near it;
2. adds 0-3 simulated clicks without gradient, each at the largest error of the current
   prediction (the evaluation clicker), feeding the predicted probability back as prev_mask;
3. predicts once more with gradient; the loss is binary cross-entropy plus Dice on the mask
   (see mask_loss for why not the normalised focal loss) plus a scale-and-shift-invariant L1
   loss of the depth against the generated depth.
The whole model is trained: ois-tiny has no pretrained Depth Anything V2 to start from.
The depth fed to the order maps is detached, so only the depth loss shapes the depth head.
"""

from __future__ import annotations

import json
import math
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from ..evaluate.clicker import PRED_THRESHOLD, Clicker, distance_to_border
from ..model import OIS, OISConfig, get_preset
from ..runtime.preprocess import fit_to_frame, to_input
from .scenes import make_scene, random_size
from .settings import TrainSettings

TRAIN_STREAM = 1  # first seed word of training scenes (held-out scenes use synthetic.HELDOUT_STREAM)
MIN_OBJECT_AREA = 0.005  # objects smaller than this fraction of the image are not chosen


@dataclass
class Batch:
    images: Tensor  # [B,3,S,S] 0..255, padded like inference input
    masks: Tensor  # [B*K,1,S,S] {0,1} target objects, K per scene, scene-major
    depth: Tensor  # [B,1,S,S] generated inverse depth
    valid: Tensor  # [B,1,S,S] 1 inside the image, 0 in the padding


def make_batch(settings: TrainSettings, step: int, size: int) -> Batch:
    images, masks, depths, valids = [], [], [], []
    for i in range(settings.batch_size):
        rng = np.random.default_rng([TRAIN_STREAM, settings.seed, step, i])
        h, w = random_size(rng, settings.scene_sizes)
        scene = make_scene(int(rng.integers(2**62)), h, w, int(rng.integers(3, 7)))
        areas = np.array([m.mean() for m in scene.masks])
        candidates = np.flatnonzero(areas >= MIN_OBJECT_AREA)
        if not len(candidates):
            candidates = np.array([areas.argmax()])
        k = settings.objects_per_scene
        targets = rng.choice(candidates, size=k, replace=len(candidates) < k)
        image, frame = to_input(scene.image, size)
        images.append(image[0])
        masks += [fit_to_frame(scene.masks[t].astype(np.float32), frame) > 0.5 for t in targets]
        depths.append(fit_to_frame(scene.depth, frame))
        valid = np.zeros((size, size), np.float32)
        valid[: frame.resized[0], : frame.resized[1]] = 1
        valids.append(valid)
    as_tensor = lambda arrays: torch.from_numpy(np.stack(arrays).astype(np.float32))  # noqa: E731
    return Batch(as_tensor(images), as_tensor(masks)[:, None], as_tensor(depths)[:, None], as_tensor(valids)[:, None])


def _sample_pixel(rng: np.random.Generator, weights: np.ndarray) -> tuple[int, int] | None:
    """A pixel drawn with probability proportional to its weight (inverse CDF: rng.choice with p
    validates and normalises the whole image on every call, a tenth of a step's host time)."""
    cdf = np.cumsum(weights, dtype=np.float64)
    if cdf[-1] <= 0:
        return None
    index = min(int(np.searchsorted(cdf, rng.uniform(0, cdf[-1]), side="right")), cdf.size - 1)
    return index % weights.shape[1], index // weights.shape[1]  # (x, y)


def initial_clicks(rng: np.random.Generator, mask: np.ndarray, valid: np.ndarray) -> list[tuple[int, int, int]]:
    """Random first clicks for one object, (x, y, label): positives weighted to the interior
    (half of the time the first one is the interior-most point, as the evaluation clicker
    places it), negatives in a band around the object."""
    inside = distance_to_border(mask)
    clicks = []
    if rng.uniform() < 0.5:
        y, x = np.unravel_index(int(inside.argmax()), inside.shape)
        clicks.append((int(x), int(y), 1))
    for _ in range(int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15])) - len(clicks)):
        xy = _sample_pixel(rng, inside)
        if xy:
            clicks.append((*xy, 1))
    if not clicks and mask.any():  # an object too thin for the distance weights
        ys, xs = np.nonzero(mask)
        k = int(rng.integers(len(ys)))
        clicks.append((int(xs[k]), int(ys[k]), 1))
    if not clicks:  # the object vanished when resized: a negative click, the answer is empty
        clicks.append((mask.shape[1] // 2, mask.shape[0] // 2, 0))
    # Pixels within `radius` of the object: a distance transform, not a dilation with a disk of
    # that radius (57 px wide at 280 px, several times slower).
    radius = max(3, int(0.1 * mask.shape[0]))
    to_object = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    band = (to_object <= radius) & ~mask & (valid > 0)
    for _ in range(int(rng.choice([0, 1, 2], p=[0.5, 0.3, 0.2]))):
        xy = _sample_pixel(rng, band)
        if xy:
            clicks.append((*xy, 0))
    return clicks


def pack_clicks(clicks: list[list[tuple[int, int, int]]]) -> tuple[Tensor, Tensor]:
    """Per-sample click lists -> coords [B,N,2] float32, labels [B,N] (-1 pads short lists)."""
    n = max(len(c) for c in clicks)
    coords = np.zeros((len(clicks), n, 2), np.float32)
    labels = np.full((len(clicks), n), -1, np.int32)
    for b, sample in enumerate(clicks):
        if sample:
            coords[b, : len(sample)] = [xy for *xy, _ in sample]
            labels[b, : len(sample)] = [label for *_, label in sample]
    return torch.from_numpy(coords), torch.from_numpy(labels)


def logits_at_input(logits: Tensor, size: int) -> Tensor:
    """Mask logits [B,1,S',S'] -> [B,1,S,S], bilinear like the host side (cv2, half-pixel centres)."""
    return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)


def mask_loss(logits: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Binary cross-entropy plus soft Dice, over the image (not the padding).

    Not RITM's normalised focal loss: trained from scratch, NFL alone (and NFL + Dice, and
    NFL + BCE + Dice) left every mask empty for the first 100 steps of our pilots while BCE + Dice
    learned (docs/model-card-ois-tiny.md)."""
    n = valid.sum(dim=(1, 2, 3)).clamp(min=1)
    bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * valid).sum(dim=(1, 2, 3)) / n
    prob = torch.sigmoid(logits) * valid
    dice = 1 - (2 * (prob * target).sum(dim=(1, 2, 3)) + 1) / (prob.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1)
    return (bce + dice).mean()


def ssi_depth_loss(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Scale-and-shift-invariant L1 (MiDaS): align pred to target by least squares per image
    over the valid pixels, then mean absolute error. Relative depth has no absolute scale."""
    b = pred.shape[0]
    p, t, m = pred.reshape(b, -1), target.reshape(b, -1), valid.reshape(b, -1)
    n = m.sum(1).clamp(min=1)
    p_mean, t_mean = (p * m).sum(1) / n, (t * m).sum(1) / n
    pc, tc = (p - p_mean[:, None]) * m, (t - t_mean[:, None]) * m
    scale = (pc * tc).sum(1) / (pc * pc).sum(1).clamp(min=1e-6)
    aligned = scale[:, None] * pc + t_mean[:, None]
    return ((aligned - t).abs() * m).sum(1).div(n).mean()


def mask_iou(logits: Tensor, target: Tensor, valid: Tensor) -> float:
    pred = (logits > 0).float() * valid
    inter = (pred * target).sum(dim=(1, 2, 3))
    union = ((pred + target) > 0).float().sum(dim=(1, 2, 3)).clamp(min=1)
    return float((inter / union).mean())


def learning_rate(settings: TrainSettings, step: int) -> float:
    """Linear warm-up, then cosine decay to 1% of the peak."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    t = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))


class StepInput(NamedTuple):
    """Everything a step needs before the model runs: host work only, so the next step's is
    prepared on a second thread while this one trains (see `train`)."""

    batch: Batch
    valid: Tensor  # [B*K,1,S,S] the batch's valid area per prompt set
    masks_np: np.ndarray  # [B*K,S,S] bool targets, for the simulated clicks
    clicks: list[list[tuple[int, int, int]]]  # initial clicks per prompt set
    rng: np.random.Generator  # the step's click stream, continued by the step itself


def prepare_step(settings: TrainSettings, step: int, size: int) -> StepInput:
    batch = make_batch(settings, step, size)
    rng = np.random.default_rng([TRAIN_STREAM, settings.seed, step, settings.batch_size])
    valid = batch.valid.repeat_interleave(settings.objects_per_scene, dim=0)
    masks_np, valid_np = batch.masks[:, 0].numpy() > 0.5, valid[:, 0].numpy()
    clicks = [initial_clicks(rng, m, v) for m, v in zip(masks_np, valid_np)]
    return StepInput(batch, valid, masks_np, clicks, rng)


def train_step(model: OIS, optimizer, settings: TrainSettings, step: int, prepared: StepInput | None = None) -> dict:
    size = model.cfg.input_size
    batch, valid, masks_np, clicks, rng = prepared or prepare_step(settings, step, size)
    k = settings.objects_per_scene

    state = model.encode(batch.images)
    # one image state per prompt set (decode takes a state of batch P)
    decode_state = type(state)(*(t.repeat_interleave(k, dim=0) for t in state))
    decode_state = decode_state._replace(depth=decode_state.depth.detach())
    prev = torch.zeros_like(batch.masks)
    extra = int(rng.integers(0, settings.max_extra_clicks + 1))
    if extra:
        clickers = [Clicker(m) for m in masks_np]
        with torch.no_grad():
            for _ in range(extra):
                coords, labels = pack_clicks(clicks)
                prob = torch.sigmoid(logits_at_input(model.decode(decode_state, coords, labels, prev), size)) * valid
                pred = (prob[:, 0] > PRED_THRESHOLD).numpy()
                for b, clicker in enumerate(clickers):
                    c = clicker.next_click(pred[b])
                    clicks[b].append((c.x, c.y, int(c.positive)))
                prev = prob
    coords, labels = pack_clicks(clicks)
    logits = logits_at_input(model.decode(decode_state, coords, labels, prev), size)
    seg_loss = mask_loss(logits, batch.masks, valid)
    depth_loss = ssi_depth_loss(state.depth, batch.depth, batch.valid)
    loss = seg_loss + settings.depth_weight * depth_loss

    lr = learning_rate(settings, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return {
        "step": step + 1,
        "loss": float(loss.detach()),
        "mask_loss": float(seg_loss.detach()),
        "depth_ssi": float(depth_loss.detach()),
        "iou": mask_iou(logits.detach(), batch.masks, valid),
        "clicks": int(labels.ge(0).sum(1).float().mean()),
        "lr": lr,
        "grad_norm": float(grad_norm),
    }


def build_model(preset: str | OISConfig, settings: TrainSettings) -> OIS:
    """A freshly initialised model (seeded), with the order-attention mode to train."""
    torch.manual_seed(settings.seed)
    cfg = get_preset(preset) if isinstance(preset, str) else preset
    return OIS(cfg).set_order_attention(settings.order_attention)


def start_training(preset: str | OISConfig, settings: TrainSettings) -> tuple[OIS, torch.optim.Optimizer]:
    """The model in training mode and its optimiser. channels_last: oneDNN's convolutions with
    few channels (24 in ois-tiny's heads) are faster in that layout, the largest of the seventh
    version's step savings (docs/model-card-ois-tiny.md); `train` writes the checkpoint contiguous."""
    model = build_model(preset, settings).train().to(memory_format=torch.channels_last)
    return model, torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)


def train(preset: str | OISConfig, settings: TrainSettings, out: str | Path, log_path: str | Path, progress=None) -> dict:
    """Train and write the checkpoint (ours, safetensors) and a JSON-lines loss log. `preset` is
    a preset's name or a config (pilots of a changed preset). `progress(step, record)` is called
    after every step. Returns the training record."""
    from ..model.weights import save_checkpoint

    out, log_path = Path(out), Path(log_path)
    for path in (out, log_path):
        if not path.parent.is_dir():
            raise UserError(f"output folder does not exist: {path.parent}")
    if settings.steps < 1:
        raise UserError("--steps must be at least 1")
    model, optimizer = start_training(preset, settings)
    start = time.perf_counter()
    tmp_log = log_path.with_name(log_path.name + ".tmp")
    size = model.cfg.input_size
    try:
        summary = _train_steps(model, optimizer, settings, start, tmp_log, size, progress)
        save_checkpoint(model, out, training=summary)
        tmp_log.replace(log_path)
    except BaseException:  # Ctrl-C or an error: no half-written log left beside the outputs
        tmp_log.unlink(missing_ok=True)
        raise
    return summary


def _train_steps(model, optimizer, settings: TrainSettings, start: float, tmp_log: Path, size: int, progress) -> dict:
    # One worker prepares step n+1's scenes and clicks while step n trains: that host work is
    # single-threaded, so it fills the gaps between the model's parallel ops. Each step's input
    # depends only on its seed words, so this changes no result.
    with open(tmp_log, "w", buffering=1) as log, ThreadPoolExecutor(1) as worker:  # log: line-buffered, followed live
        upcoming = worker.submit(prepare_step, settings, 0, size)
        for step in range(settings.steps):
            prepared = upcoming.result()
            if step + 1 < settings.steps:
                upcoming = worker.submit(prepare_step, settings, step + 1, size)
            record = train_step(model, optimizer, settings, step, prepared)
            record["seconds"] = round(time.perf_counter() - start, 2)
            log.write(json.dumps(record) + "\n")
            if progress:
                progress(step, record)
    model.eval().to(memory_format=torch.contiguous_format)
    summary = {
        "preset": model.cfg.name,
        "settings": asdict(settings),
        "seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} ({torch.get_num_threads()} threads)".strip(),
    }
    return summary
