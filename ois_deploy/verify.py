"""Parity of a backend against the PyTorch FP32 reference (docs/design.md §5), through the
Runner interface only, so every backend is checked the same way.

(a) numeric, per graph: the encoder on fresh random images; the decoder on random clicks at
    several (P, N), both sides decoding the reference's image state as handed over to the
    backend (in its precision).
(b) interactive, end to end: on real images, click sessions through the Predictor, both sides
    decoding each click from the reference's previous mask; logits and masks at every click.
Reported per precision and output: max abs error, relative L2 error, non-finite count, and for
mask logits the IoU of thresholded masks (logit > 0), mean and minimum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .contract import ENCODER_OUTPUTS, read_manifest
from .errors import UserError, first_line
from .model.weights import reference_model
from .provenance import machine_info, now_utc, tool_versions
from .runtime.predictor import Predictor
from .runtime.preprocess import DEFAULT_MAX_PIXELS, read_image, sigmoid
from .runtime.registry import RunnerSpec, check_spec, get_backend, open_runner
from .runtime.torch_backend import TorchRunner

# Relative L2 error and mask IoU thresholds per precision (docs/design.md §5); overridable.
TOLERANCES = {
    "fp32": {"rel_l2": 1e-4, "mask_iou_mean": 0.99, "mask_iou_min": 0.9},
    "fp16": {"rel_l2": 1e-2, "mask_iou_mean": 0.98, "mask_iou_min": 0.5},
    "int8": {"rel_l2": 0.15, "mask_iou_mean": 0.98, "mask_iou_min": 0.5},  # rel_l2 measured: docs/design.md §4.1
    # BF16 (8 mantissa bits against FP16's 11), measured with openvino on ois-tiny: rel_l2 up to
    # 0.043 (random weights' depth), session mask IoU mean 0.976 (trained): docs/design.md §4.2
    "bf16": {"rel_l2": 0.05, "mask_iou_mean": 0.97, "mask_iou_min": 0.5},
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


def random_clicks(cfg, rng: np.random.Generator):
    """(coords, labels, prev_mask) at each (P, N): random clicks (first positive, then mixed with
    padding) and blob-like previous masks."""
    s = cfg.input_size
    for p, n in DECODER_SHAPES:
        labels = rng.choice(np.array([1, 0, -1], np.int32), size=(p, n), p=[0.4, 0.4, 0.2])
        labels[:, 0] = 1
        coords = (rng.random((p, n, 2)) * (s - 1)).astype(np.float32)
        yield coords, labels, smooth_masks(rng, p, s)


def smooth_masks(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    """Blob-like previous-mask probabilities, so that object-aware attention has something to do."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    masks = []
    for _ in range(count):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
        masks.append(sigmoid((r - np.hypot(xx - cx, yy - cy)) * 40))
    return np.stack(masks)[:, None].astype(np.float32)


def compare_graphs(reference: TorchRunner, runner, precision: str, rng: np.random.Generator, images: int = 2) -> list[Metric]:
    """Part (a): the backend's encoder and decoder against the reference's on the same inputs."""
    s = reference.cfg.input_size
    metrics = {name: Metric(precision, f"encoder/{name}") for name in ENCODER_OUTPUTS}
    metrics["mask_logits"] = Metric(precision, "decoder/mask_logits")

    ref_states = []
    for _ in range(images):
        image = (rng.random((1, 3, s, s)) * 255).astype(np.float32)
        got, ref = runner.state_to_numpy(runner.encode(image)), reference.state_to_numpy(reference.encode(image))
        ref_states.append(ref)
        for name in ENCODER_OUTPUTS:
            metrics[name].add(got[name], ref[name])

    # The decoders read the reference's state as the backend holds it (an fp16 backend, rounded).
    handed = runner.state_from_numpy(ref_states[0])
    as_given = reference.state_from_numpy(runner.state_to_numpy(handed))
    for coords, labels, prev in random_clicks(reference.cfg, rng):
        ref = reference.decode(as_given, coords, labels, prev)
        metrics["mask_logits"].add(runner.decode(handed, coords, labels, prev), ref, masks=True)
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


def compare_sessions(reference, runner, precision: str, images: list[Path], rng,
                     max_image_pixels: int = DEFAULT_MAX_PIXELS) -> Metric:
    """Part (b): click sessions on real images through the Predictor. Both sides decode each
    click from the same previous mask, the reference's: the object-aware bias thresholds the
    pooled previous mask, so with each side feeding back its own mask a 1e-3 difference can flip
    a token at the threshold and steer the rest of the session away (seen with FP16 on an H100).
    Divergence over whole sessions is task-level parity: `eval --compare-backend`."""
    metric = Metric(precision, "session/mask_logits")
    for path in images:
        image = read_image(path, max_image_pixels)
        clicks = [(x, y, bool(label)) for x, y, label in session_clicks(rng, image.shape[0], image.shape[1], SESSION_CLICKS)]
        ref, got = Predictor(reference), Predictor(runner)
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
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    int8_decoder: str = "qdq",
) -> dict:
    """Compare a backend's graphs with the PyTorch FP32 model. Returns the JSON result.
    int8_decoder: the int8 precision's decoder (qdq, or nncf on openvino; RunnerSpec)."""
    manifest = read_manifest(export_dir)
    if backend == "trt" and manifest.get("engines"):
        precisions = (manifest["engines"]["precision"],)  # engines exist for one precision
    if backend == "aoti" and manifest.get("aoti") and not precisions:  # the precisions packages were built for
        precisions = tuple(p for p in manifest["precisions"] if any(e["precision"] == p for e in manifest["aoti"].values()))
    # by default what was exported and the backend runs (bf16, a runtime setting, only when asked)
    precisions = precisions or tuple(p for p in manifest["precisions"] if p in get_backend(backend).precisions)
    if int8_decoder != "qdq":  # refused before the long run, not at the int8 step
        if "int8" not in precisions:
            raise UserError(f"the {int8_decoder} int8 decoder applies to the int8 precision, which is not checked here")
        check_spec(RunnerSpec(backend, str(export_dir), "int8", int8_decoder=int8_decoder))
    image_paths = list_images(images)
    step = progress or (lambda text: None)
    step("load the PyTorch FP32 reference")
    model = reference_model(manifest, checkpoint)
    reference = TorchRunner(model)
    reference.name = "torch-fp32"
    rows, failures = [], []
    for precision in precisions:
        tol = {**TOLERANCES[precision], **((tolerances or {}).get(precision, {}))}
        runner = open_runner(RunnerSpec(backend, str(export_dir), precision,
                                        int8_decoder=int8_decoder if precision == "int8" else "qdq"))
        rng = np.random.default_rng(seed)
        try:
            step(f"{precision}: graphs on random inputs")
            metrics = compare_graphs(reference, runner, precision, rng)
            step(f"{precision}: click sessions on {len(image_paths)} images")
            metrics.append(compare_sessions(reference, runner, precision, image_paths, rng, max_image_pixels))
        except UserError:
            raise
        except Exception as e:  # a backend that cannot run its graph is a verdict, not a crash
            raise UserError(f"{runner.name} failed to run the {precision} graphs: {first_line(e)}") from None
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
        **({"int8_decoder": int8_decoder} if "int8" in precisions else {}),
        "machine": machine_info(),
        "versions": tool_versions(),
        "date": now_utc(),
    }
