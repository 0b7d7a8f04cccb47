"""Parity of a backend against the PyTorch FP32 reference (DESIGN §5).

(a) numeric, per graph: Polygraphy's Comparator runs the backend's ONNX Runtime sessions beside
    a runner for the PyTorch model on the same inputs: fresh random images, and for the decoder
    random clicks at several (P, N) on the reference image state.
(b) interactive, end to end: on real images, a click session where each side feeds back its own
    previous mask; logits and masks compared at every click.
Reported per precision and output: max abs error, relative L2 error, non-finite count, and for
mask logits the IoU of thresholded masks (logit > 0), mean and minimum.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .exporters.onnx_export import (
    ENCODER_OUTPUTS,
    DecoderGraph,
    EncoderGraph,
    read_manifest,
    state_dict_hash,
)
from .preprocess import read_image, sigmoid
from .provenance import machine_info, now_utc, tool_versions
from .weights import RANDOM_WEIGHTS, load_model

# Relative L2 error and mask IoU thresholds per precision (DESIGN §5); overridable.
TOLERANCES = {
    "fp32": {"rel_l2": 1e-4, "mask_iou_mean": 0.99, "mask_iou_min": 0.9},
    "fp16": {"rel_l2": 1e-2, "mask_iou_mean": 0.98, "mask_iou_min": 0.5},
}
DECODER_SHAPES = ((1, 1), (3, 24), (16, 5))  # (P, N)
SESSION_CLICKS = 5
ASSETS = Path(__file__).parent / "assets"


@dataclass
class Metric:
    """Accumulates the error of one output over many comparisons."""

    precision: str
    output: str
    max_abs: float = 0.0
    err_sq: float = 0.0
    ref_sq: float = 0.0
    nonfinite: int = 0
    ious: list[float] = field(default_factory=list)

    def add(self, got: np.ndarray, ref: np.ndarray, masks: bool = False) -> None:
        got, ref = got.astype(np.float64), ref.astype(np.float64)
        finite = np.isfinite(got)
        self.nonfinite += int((~finite).sum())
        diff = np.where(finite, got - ref, 0.0)
        self.max_abs = max(self.max_abs, float(np.abs(diff).max(initial=0.0)))
        self.err_sq += float((diff**2).sum())
        self.ref_sq += float((ref**2).sum())
        if masks:  # one IoU per prompt set
            for g, r in zip(got.reshape(len(got), -1) > 0, ref.reshape(len(ref), -1) > 0):
                union = (g | r).sum()
                self.ious.append(1.0 if union == 0 else float((g & r).sum() / union))

    @property
    def rel_l2(self) -> float:
        if self.ref_sq == 0:
            return 0.0 if self.err_sq == 0 else float("inf")
        return float(np.sqrt(self.err_sq / self.ref_sq))

    def row(self) -> dict:
        return {
            "precision": self.precision,
            "output": self.output,
            "max_abs": self.max_abs,
            "rel_l2": self.rel_l2,
            "nonfinite": self.nonfinite,
            "mask_iou_mean": float(np.mean(self.ious)) if self.ious else None,
            "mask_iou_min": float(np.min(self.ious)) if self.ious else None,
        }

    def failures(self, tol: dict) -> list[str]:
        row = self.row()
        bad = []
        if row["nonfinite"]:
            bad.append(f"{row['nonfinite']} non-finite values")
        if not row["rel_l2"] <= tol["rel_l2"]:
            bad.append(f"rel_l2 {row['rel_l2']:.2e} > {tol['rel_l2']:.0e}")
        if row["mask_iou_mean"] is not None and row["mask_iou_mean"] < tol["mask_iou_mean"]:
            bad.append(f"mask IoU mean {row['mask_iou_mean']:.4f} < {tol['mask_iou_mean']}")
        if row["mask_iou_min"] is not None and row["mask_iou_min"] < tol["mask_iou_min"]:
            bad.append(f"mask IoU min {row['mask_iou_min']:.4f} < {tol['mask_iou_min']}")
        return bad


def torch_polygraphy_runner(module: torch.nn.Module, session, output_names, name: str):
    """A Polygraphy runner around a PyTorch module that takes the inputs of an ONNX Runtime
    session, on the CPU (Polygraphy's own PytRunner needs CUDA)."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata
    from polygraphy.datatype import DataType

    input_names = [i.name for i in session.get_inputs()]

    class TorchRunner(BaseRunner):
        def activate_impl(self):
            pass

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for i in session.get_inputs():
                meta.add(i.name, dtype=DataType.from_dtype(i.type, "onnxruntime"), shape=i.shape)
            return meta

        def infer_impl(self, feed_dict):
            args = [torch.from_numpy(np.asarray(feed_dict[n])) for n in input_names]
            args = [a.float() if a.is_floating_point() else a for a in args]  # the FP32 reference
            start = time.time()
            with torch.inference_mode():
                outputs = module(*args)
            self.inference_time = time.time() - start
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            return OrderedDict((n, o.float().numpy()) for n, o in zip(output_names, outputs))

        def deactivate_impl(self):
            pass

    return TorchRunner(name=name)


def reference_model(manifest: dict, checkpoint: str | None):
    """The PyTorch FP32 model the graphs were exported from; refuses one that is not."""
    weights = manifest.get("weights", {})
    if weights.get("format") == "random":
        model, _ = load_model(manifest["preset"], RANDOM_WEIGHTS)
    elif weights.get("bundled") and not checkpoint:  # this install's copy; the hash below checks it
        model, _ = load_model(manifest["preset"])
    else:
        path = checkpoint or weights.get("path")
        if not path or not Path(path).is_file():
            raise UserError(f"the reference checkpoint {path} is not here: pass --checkpoint")
        model, _ = load_model(None, path)
    if state_dict_hash(model) != manifest["model_hash"]:
        raise UserError("the reference model's weights differ from those the graphs were exported from")
    return model


def random_feeds(cfg, rng: np.random.Generator, state: dict[str, np.ndarray], state_dtype):
    """Decoder feeds at each (P, N): random clicks (first positive, then mixed with padding)."""
    s = cfg.input_size
    for p, n in DECODER_SHAPES:
        labels = rng.choice(np.array([1, 0, -1], np.int32), size=(p, n), p=[0.4, 0.4, 0.2])
        labels[:, 0] = 1
        feed = {k: v.astype(state_dtype if k != "depth" else np.float32) for k, v in state.items()}
        feed["point_coords"] = (rng.random((p, n, 2)) * (s - 1)).astype(np.float32)
        feed["point_labels"] = labels
        feed["prev_mask"] = smooth_masks(rng, p, s)
        yield feed


def smooth_masks(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    """Blob-like previous-mask probabilities, so that object-aware attention has something to do."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    masks = []
    for _ in range(count):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
        masks.append(sigmoid((r - np.hypot(xx - cx, yy - cy)) * 40))
    return np.stack(masks)[:, None].astype(np.float32)


def compare_with_polygraphy(module, runner, role: str, precision: str, feeds: list[dict]):
    """Run the PyTorch module and the backend's ONNX Runtime session of `role` on the same feeds;
    yields (backend outputs, reference outputs) per feed."""
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    session = runner.sessions[role]
    outputs = [o.name for o in session.get_outputs()]
    results = Comparator.run(
        [
            torch_polygraphy_runner(module, session, outputs, "torch-fp32"),
            OnnxrtRunner(session, name=f"{runner.name}-{precision}"),
        ],
        data_loader=feeds,
    )
    (_, ref_iters), (_, got_iters) = results.items()
    return zip(got_iters, ref_iters)


def compare_graphs(model, runner, precision: str, rng: np.random.Generator, images: int = 2) -> list[Metric]:
    """Part (a): encoder and decoder graphs against PyTorch on the same inputs (Polygraphy)."""
    s = model.cfg.input_size
    metrics = {name: Metric(precision, f"encoder/{name}") for name in ENCODER_OUTPUTS}
    metrics["mask_logits"] = Metric(precision, "decoder/mask_logits")

    image_feeds = [{"image": (rng.random((1, 3, s, s)) * 255).astype(np.float32)} for _ in range(images)]
    for got, ref in compare_with_polygraphy(EncoderGraph(model), runner, "encoder", precision, image_feeds):
        for name in ENCODER_OUTPUTS:
            metrics[name].add(np.asarray(got[name]), np.asarray(ref[name]))

    with torch.inference_mode():
        state = {k: v.numpy() for k, v in model.encode(torch.from_numpy(image_feeds[0]["image"]))._asdict().items()}
    feeds = list(random_feeds(model.cfg, rng, state, runner.input_types["image_embed"]))
    for got, ref in compare_with_polygraphy(DecoderGraph(model), runner, "decoder", precision, feeds):
        metrics["mask_logits"].add(np.asarray(got["mask_logits"]), np.asarray(ref["mask_logits"]), masks=True)
    return list(metrics.values())


def compare_runner_graphs(model, runner, precision: str, rng: np.random.Generator, images: int = 2) -> list[Metric]:
    """Part (a) for backends that are not ONNX Runtime sessions (TensorRT, torch-cuda), through
    the runner interface: encoder outputs, then the decoder on the backend's own image state."""
    s = model.cfg.input_size
    metrics = {name: Metric(precision, f"encoder/{name}") for name in ENCODER_OUTPUTS}
    metrics["mask_logits"] = Metric(precision, "decoder/mask_logits")
    for i in range(images):
        image = (rng.random((1, 3, s, s)) * 255).astype(np.float32)
        with torch.inference_mode():
            ref_state = model.encode(torch.from_numpy(image))
        state = runner.encode(image)
        got = runner.state_to_numpy(state)
        for name, ref in ref_state._asdict().items():
            metrics[name].add(got[name], ref.numpy())
        if i == 0:
            ref_np = {k: v.numpy() for k, v in ref_state._asdict().items()}
            for feed in random_feeds(model.cfg, rng, ref_np, np.float32):
                clicks = (feed["point_coords"], feed["point_labels"], feed["prev_mask"])
                with torch.inference_mode():
                    ref = model.decode(ref_state, *(torch.from_numpy(c) for c in clicks)).numpy()
                metrics["mask_logits"].add(runner.decode(state, *clicks), ref, masks=True)
    return list(metrics.values())


def bundled_images() -> list[Path]:
    return sorted(ASSETS.glob("*.png")) + sorted(ASSETS.glob("*.jpg"))


def session_clicks(rng: np.random.Generator, height: int, width: int, count: int) -> list[tuple[float, float, int]]:
    """A reproducible click sequence: first positive, then mixed."""
    clicks = []
    for i in range(count):
        label = 1 if i == 0 else int(rng.random() < 0.6)
        clicks.append((float(rng.integers(0, width)), float(rng.integers(0, height)), label))
    return clicks


def compare_sessions(reference, runner, precision: str, images: list[Path], rng) -> Metric:
    """Part (b): click sessions on real images through the Predictor. Both sides decode each
    click from the same previous mask, the reference's: the object-aware bias thresholds the
    pooled previous mask, so with each side feeding back its own mask a 1e-3 difference can flip
    a token at the threshold and steer the rest of the session away (seen with FP16 on an H100).
    Divergence over whole sessions is task-level parity: `eval --compare-backend`."""
    from .predictor import Predictor

    metric = Metric(precision, "session/mask_logits")
    for path in images:
        image = read_image(path)
        clicks = [(x, y, bool(label)) for x, y, label in session_clicks(rng, image.shape[0], image.shape[1], SESSION_CLICKS)]
        ref, got = Predictor.from_runner(reference, reference.name), Predictor.from_runner(runner, runner.name)
        ref.set_image(image)
        got.set_image(image)
        prev = None  # probability at the image's size
        for k in range(1, len(clicks) + 1):
            expected = ref.predict(clicks[:k], prev).logits
            metric.add(got.predict(clicks[:k], prev).logits[None], expected[None], masks=True)
            prev = sigmoid(expected)
    return metric


def list_images(folder: str | Path | None) -> list[Path]:
    if folder is None:
        return bundled_images()
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
    if not found:
        raise UserError(f"no images (.png, .jpg, .bmp, .webp) in {folder}")
    return found


def verify(
    export_dir: str | Path,
    backend: str = "ort",
    precisions: tuple[str, ...] | None = None,
    images: str | Path | None = None,
    checkpoint: str | None = None,
    tolerances: dict | None = None,
    seed: int = 0,
    progress=None,
) -> dict:
    """Compare a backend's graphs with the PyTorch FP32 model. Returns the JSON result."""
    from .predictor import TorchRunner, make_runner

    manifest = read_manifest(export_dir)
    if backend == "trt" and manifest.get("engines"):
        precisions = (manifest["engines"]["precision"],)  # engines exist for one precision
    precisions = precisions or tuple(manifest["precisions"])
    image_paths = list_images(images)
    step = progress or (lambda text: None)
    step("load the PyTorch FP32 reference")
    model = reference_model(manifest, checkpoint)
    reference = TorchRunner(model)
    rows, failures = [], []
    for precision in precisions:
        tol = {**TOLERANCES[precision], **((tolerances or {}).get(precision, {}))}
        runner, _ = make_runner(backend, export_dir=export_dir, precision=precision)
        rng = np.random.default_rng(seed)
        try:
            step(f"{precision}: graphs on random inputs")
            compare = compare_graphs if hasattr(runner, "sessions") else compare_runner_graphs
            metrics = compare(model, runner, precision, rng)
            step(f"{precision}: click sessions on {len(image_paths)} images")
            metrics.append(compare_sessions(reference, runner, precision, image_paths, rng))
        except UserError:
            raise
        except Exception as e:  # a backend that cannot run its graph is a verdict, not a crash
            raise UserError(f"{runner.name} failed to run the {precision} graphs: {str(e).strip().splitlines()[0]}") from None
        for m in metrics:
            rows.append(m.row())
            failures += [f"{precision} {m.output}: {f}" for f in m.failures(tol)]
    return {
        "passed": not failures,
        "backend": backend,
        "preset": manifest["preset"],
        "providers": getattr(runner, "providers", [runner.name]),
        "results": rows,
        "failures": failures,
        "tolerances": {p: {**TOLERANCES[p], **((tolerances or {}).get(p, {}))} for p in precisions},
        "images": [str(p) for p in image_paths],
        "machine": machine_info(),
        "versions": tool_versions(),
        "date": now_utc(),
    }
