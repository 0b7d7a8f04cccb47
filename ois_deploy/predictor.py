"""Interactive predictor: set an image once, then click; the previous mask is fed back.

Backends run the two halves of the model (encode once per image, decode per click) behind one
small interface, so the host-side logic here is shared by all of them.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import cv2
import numpy as np
import torch

from .errors import UserError
from .preprocess import Frame, as_rgb, logits_to_image, logits_to_input_frame, sigmoid, to_input
from .weights import describe_weights, load_model

BACKENDS = ("torch", "torch-cuda", "ort", "ort-cuda", "ort-trt", "trt")
ORT_PROVIDERS = {"ort": None, "ort-cuda": "cuda", "ort-trt": "tensorrt"}


class Prediction(NamedTuple):
    mask: np.ndarray  # bool [H,W] at the original image size
    logits: np.ndarray  # float32 [H,W]


class CudaGraphDecoder:
    """The P = 1 decoder call replayed from CUDA graphs, one per click count N, captured on first
    use: a small decoder's time per click is mostly kernel-launch overhead, which replay removes.
    Graphs read static buffers: the image state is copied in once per image, clicks per call."""

    def __init__(self, model):
        self.model = model
        self.state = None  # static copy of the current image state
        self.graphs: dict[int, tuple] = {}  # N -> (graph, static inputs, static output)

    def set_state(self, state) -> None:
        if self.state is None:
            self.state = type(state)(*(t.clone() for t in state))
        else:
            for static, new in zip(self.state, state):
                static.copy_(new)

    def decode(self, coords, labels, prev):
        n = coords.shape[1]
        if n not in self.graphs:
            self.graphs[n] = self._capture(coords, labels, prev)
        graph, inputs, out = self.graphs[n]
        for static, new in zip(inputs, (coords, labels, prev)):
            static.copy_(new)
        graph.replay()
        return out

    def _capture(self, coords, labels, prev):
        inputs = (coords.clone(), labels.clone(), prev.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph: lazy initialisation and autotuning
                self.model.decode(self.state, *inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.model.decode(self.state, *inputs)
        return graph, inputs, out


class TorchRunner:
    """The PyTorch reference model; the image state stays on the device between clicks. On a GPU
    the per-click (P = 1) decoder call runs from CUDA graphs unless cuda_graphs=False."""

    name = "torch"

    def __init__(self, model, device: str = "cpu", cuda_graphs: bool | None = None):
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise UserError("device cuda requested but PyTorch sees no CUDA GPU")
            # FP32 means IEEE FP32: cuDNN's default TF32 convolutions put ois-tiny 1.1e-4 to 3.6e-4
            # (relative L2) away from the CPU reference on an H100, over the FP32 parity tolerance.
            torch.backends.cudnn.allow_tf32 = False
            torch.set_float32_matmul_precision("highest")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.cfg = model.cfg
        use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.graphs = CudaGraphDecoder(self.model) if use_graphs else None
        self._graph_state = None  # the encode() result the graphs hold a copy of

    @torch.inference_mode()
    def encode(self, image: np.ndarray):
        state = self.model.encode(torch.from_numpy(image).to(self.device))
        if self.graphs is not None:
            self.graphs.set_state(state)
            self._graph_state = state
        return state

    @torch.inference_mode()
    def decode(self, state, coords: np.ndarray, labels: np.ndarray, prev_mask: np.ndarray) -> np.ndarray:
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
        inputs = (t(coords), t(labels), t(prev_mask))
        if self.graphs is not None and state is self._graph_state and coords.shape[0] == 1:
            try:
                return self.graphs.decode(*inputs).float().cpu().numpy()
            except RuntimeError as e:  # capture unsupported here: stay correct, run eagerly
                print(f"note: CUDA graphs off ({str(e).splitlines()[0]})", file=sys.stderr)
                self.graphs = None
        return self.model.decode(state, *inputs).float().cpu().numpy()

    def state_to_numpy(self, state) -> dict[str, np.ndarray]:
        return {k: v.float().cpu().numpy() for k, v in state._asdict().items()}


def make_runner(backend: str, preset=None, checkpoint=None, device=None, export_dir=None, precision="fp32",
                order_attention=None):
    """(runner, human notes about the weights) for a backend name.

    torch / torch-cuda run the PyTorch model of preset/checkpoint, or the reference model of an
    export folder; ort runs the graphs of an export folder. order_attention (bias, mask, off)
    overrides the model's mode, for the PyTorch backends only (ablations)."""
    if precision not in ("fp32", "fp16"):
        raise UserError(f"precision must be fp32 or fp16, not {precision!r}")
    if order_attention is not None and backend not in ("torch", "torch-cuda"):
        raise UserError("an order-attention override applies to the torch backends only (graphs fix it at export)")
    if backend in ("torch", "torch-cuda"):
        if backend == "torch-cuda":
            if not torch.cuda.is_available():
                raise UserError("backend torch-cuda needs a CUDA GPU and a CUDA build of PyTorch; none found here")
            device = "cuda"
        if export_dir is not None:
            from .exporters.onnx_export import read_manifest
            from .parity import reference_model

            model, notes = reference_model(read_manifest(export_dir), checkpoint), [f"weights: those of {export_dir}"]
        else:
            model, report = load_model(preset, checkpoint)
            notes = describe_weights(report)
        if order_attention is not None:
            try:
                model.set_order_attention(order_attention)
            except ValueError as e:
                raise UserError(str(e)) from None
            notes.append(f"order-aware attention: {order_attention}")
        if precision == "fp16":
            from .model.precision import to_fp16

            model = to_fp16(model)
        return TorchRunner(model, device or "cpu"), notes
    if backend in ORT_PROVIDERS or backend == "trt":
        if export_dir is None:
            raise UserError(f"backend {backend} runs exported graphs: give the export folder (ois-deploy export --out DIR)")
    if backend in ORT_PROVIDERS:
        from .engines.ort import OrtRunner

        runner = OrtRunner(export_dir, precision, providers=ORT_PROVIDERS[backend] or device or "auto")
        return runner, runner.weights_notes()
    if backend == "trt":
        from .engines.tensorrt import TrtRunner

        runner = TrtRunner(export_dir)
        return runner, runner.weights_notes()
    raise UserError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")


def predictor_for(model: str, backend: str | None = None, checkpoint=None, precision="fp32", device=None,
                  order_attention=None):
    """A Predictor for a MODEL argument: a preset name, or an export folder (manifest.json)."""
    from pathlib import Path

    is_export = (Path(model) / "manifest.json").is_file()
    if not is_export and Path(model).exists() and Path(model).is_dir():
        raise UserError(f"{model} is a folder without manifest.json: not an export folder")
    backend = backend or ("ort" if is_export else "torch")
    if backend not in ("torch", "torch-cuda") and not is_export:
        raise UserError(f"backend {backend} needs an export folder, and {model!r} is not one (ois-deploy export --out DIR)")
    if is_export:
        return Predictor(None, checkpoint, backend, device, export_dir=model, precision=precision,
                         order_attention=order_attention)
    return Predictor(model, checkpoint, backend, device, precision=precision, order_attention=order_attention)


class Predictor:
    def __init__(
        self,
        preset: str | None = "ois-tiny",
        checkpoint=None,
        backend: str = "torch",
        device: str | None = None,
        export_dir=None,
        precision: str = "fp32",
        order_attention: str | None = None,
    ):
        """backend torch: the PyTorch model of preset/checkpoint, device cpu (default) or cuda;
        torch-cuda: the same on the GPU. backend ort: the graphs of export_dir, device = ONNX
        Runtime providers auto (default), cpu, cuda or tensorrt. precision fp32 or fp16.
        order_attention: override of the model's order-attention mode (torch backends)."""
        runner, notes = make_runner(backend, preset, checkpoint, device, export_dir, precision, order_attention)
        self._attach(backend, runner, notes)

    @classmethod
    def from_runner(cls, runner, backend: str) -> "Predictor":
        """A Predictor around a runner that already exists (verify shares runners)."""
        predictor = cls.__new__(cls)
        predictor._attach(backend, runner, [])
        return predictor

    def _attach(self, backend: str, runner, notes: list[str]) -> None:
        self.backend, self.runner, self.notes = backend, runner, notes
        self.cfg = runner.cfg
        self.frame: Frame | None = None
        self._state = None
        self.reset()

    @property
    def max_clicks(self) -> int:
        return self.cfg.decoder.max_clicks

    def set_image(self, image: np.ndarray) -> None:
        """HxW, HxWx3 or HxWx4 uint8 of any size. Encodes once; clears the clicks."""
        tensor, self.frame = to_input(as_rgb(image), self.cfg.input_size)
        self._state = self.runner.encode(tensor)
        self.reset()

    def reset(self) -> None:
        """Forget clicks and previous mask; keep the image."""
        self.clicks: list[tuple[float, float, bool]] = []
        s = self.cfg.input_size
        self._prev = np.zeros((1, 1, s, s), np.float32)

    def click(self, x: float, y: float, positive: bool = True, threshold: float = 0.5) -> Prediction:
        """Add a click at column x, row y (original image pixels) and predict with all clicks so far.
        The mask is probability > threshold (the evaluation protocol uses 0.49)."""
        self._require_image()
        self.frame.check_click(x, y)
        if len(self.clicks) >= self.max_clicks:
            raise UserError(f"at most {self.max_clicks} clicks per object")
        self.clicks.append((float(x), float(y), bool(positive)))
        logits_sxs = self._decode_sxs(self.clicks, self._prev)
        self._prev = self._feedback(logits_sxs)
        return self._prediction(logits_sxs, threshold)

    def predict(self, clicks: list[tuple[float, float, bool]], prev_mask: np.ndarray | None = None) -> Prediction:
        """Stateless: clicks (x, y, positive) in original pixels, prev_mask an optional [H,W] probability."""
        self._require_image()
        if not 1 <= len(clicks) <= self.max_clicks:
            raise UserError(f"give between 1 and {self.max_clicks} clicks, got {len(clicks)}")
        for x, y, _ in clicks:
            self.frame.check_click(x, y)
        prev = np.zeros((1, 1, self.cfg.input_size, self.cfg.input_size), np.float32)
        if prev_mask is not None:
            if prev_mask.shape != (self.frame.height, self.frame.width):
                raise UserError(f"prev_mask must be {self.frame.height}x{self.frame.width}, got {prev_mask.shape}")
            h, w = self.frame.resized
            prev[0, 0, :h, :w] = cv2.resize(prev_mask.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        return self._prediction(self._decode_sxs(clicks, prev))

    def _require_image(self) -> None:
        if self._state is None:
            raise UserError("call set_image() before clicking")

    def _decode_sxs(self, clicks, prev: np.ndarray) -> np.ndarray:
        coords = self.frame.to_input(np.array([[x, y] for x, y, _ in clicks], np.float32))[None]
        labels = np.array([[1 if p else 0 for _, _, p in clicks]], np.int32)
        logits = self.runner.decode(self._state, coords, labels, prev)
        return logits_to_input_frame(logits[0, 0], self.cfg.input_size)

    def _feedback(self, logits_sxs: np.ndarray) -> np.ndarray:
        """Probability fed back as the next prev_mask; the padding outside the image is zero."""
        prob = np.zeros_like(logits_sxs)
        h, w = self.frame.resized
        prob[:h, :w] = sigmoid(logits_sxs[:h, :w])
        return prob[None, None]

    def _prediction(self, logits_sxs: np.ndarray, threshold: float = 0.5) -> Prediction:
        logits = logits_to_image(logits_sxs, self.frame)
        return Prediction(logits > np.log(threshold / (1 - threshold)), logits)
