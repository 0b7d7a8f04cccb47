"""PyTorch backends (torch, torch-cuda): the reference model of a preset, a checkpoint, or the
weights an export folder was made from."""

from __future__ import annotations

import sys

import numpy as np
import torch

from ..contract import read_manifest
from ..errors import UserError, first_line
from ..model import ImageState
from ..model.weights import describe_weights, load_model, reference_model
from . import torch_geometry as geometry
from .base import Runner
from .preprocess import STRIP_ELEMENTS, Frame, logit_cut


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


class TorchRunner(Runner):
    """The PyTorch reference model; the image state stays on the device between clicks, and so
    does the click loop around the decoder (torch_geometry): only the final mask, and logits where
    asked, come back to the host. On a GPU the per-click (P = 1) decoder call runs from CUDA graphs
    unless cuda_graphs=False. A module holds no per-call state on the CPU, but CUDA graphs replay
    static buffers: shared across threads only on the CPU.

    `model` is an OIS module or anything with its encode/decode/cfg/dtype (an AOTInductor package)."""

    name = "torch"

    def __init__(self, model, device: str = "cpu", cuda_graphs: bool | None = None, notes: list[str] | None = None):
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise UserError("device cuda requested but PyTorch sees no CUDA GPU")
            # FP32 means IEEE FP32: cuDNN's default TF32 convolutions put ois-tiny 1.1e-4 to 3.6e-4
            # (relative L2) away from the CPU reference on an H100, over the FP32 parity tolerance.
            torch.backends.cudnn.allow_tf32 = False
            torch.set_float32_matmul_precision("highest")
        precision = "fp16" if model.dtype == torch.float16 else "fp32"
        super().__init__(model.cfg, precision, str(torch.device(device)), notes)
        self.torch_device = torch.device(device)
        self.model = model.to(self.torch_device).eval()
        self.thread_safe = self.torch_device.type == "cpu"
        use_graphs = self.torch_device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.graphs = CudaGraphDecoder(self.model) if use_graphs else None
        self._graph_state = None  # the encode() result the graphs hold a copy of
        self._zeros = None  # empty_prev's mask
        # A GPU's memory is not the host's: one strip there; on the CPU strips bound the temporaries.
        self._strip_elements = STRIP_ELEMENTS if self.torch_device.type == "cpu" else 1 << 28

    def synchronize(self) -> None:
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize()

    def _tensor(self, array) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(array) if isinstance(array, np.ndarray) else array,
                               device=self.torch_device)

    @torch.inference_mode()
    def _encode(self, image):
        state = self.model.encode(self._tensor(image))
        if self.graphs is not None:
            self.graphs.set_state(state)
            self._graph_state = state
        return state

    def _decode_on_device(self, state, coords: torch.Tensor, labels: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Logits [P,1,S',S'] on the device (a CUDA graph's static output: use before the next call)."""
        if self.graphs is not None and state is self._graph_state and coords.shape[0] == 1:
            try:
                return self.graphs.decode(coords, labels, prev)
            except RuntimeError as e:  # capture unsupported here: stay correct, run eagerly
                print(f"note: CUDA graphs off ({first_line(e)})", file=sys.stderr)
                self.graphs = None
        return self.model.decode(state, coords, labels, prev)

    def _timed_decode(self, state, coords, labels, prev) -> torch.Tensor:
        """decode(), leaving the logits on the device."""
        return self._measured("decode", self._decode_on_device, state, self._tensor(coords), self._tensor(labels),
                              self._tensor(prev))

    @torch.inference_mode()
    def _decode(self, state, coords: np.ndarray, labels: np.ndarray, prev_mask: np.ndarray) -> np.ndarray:
        inputs = (self._tensor(coords), self._tensor(labels), self._tensor(prev_mask))
        return self._decode_on_device(state, *inputs).float().cpu().numpy()

    # -- the click loop on the device ------------------------------------------------------------
    @torch.inference_mode()
    def encode_frame(self, image: np.ndarray, frame: Frame):
        """On a GPU the uint8 image goes up once and is resized and padded there; on the CPU the
        host's resize (cv2) is that device's and the leaner one."""
        if self.torch_device.type == "cpu":
            return super().encode_frame(image, frame)
        return self.encode(geometry.fit_to_frame(self._tensor(image), frame))

    def empty_prev(self, prompts: int = 1) -> torch.Tensor:
        """One read-only zero mask on the device, expanded to P prompt sets without a copy."""
        if self._zeros is None:
            s = self.cfg.input_size
            self._zeros = torch.zeros((1, 1, s, s), device=self.torch_device)
        return self._zeros.expand(prompts, -1, -1, -1)

    def prev_from_numpy(self, prob: np.ndarray) -> torch.Tensor:
        return self._tensor(np.asarray(prob, np.float32))

    @torch.inference_mode()
    def decode_to_image(self, state, frame: Frame, coords: np.ndarray, labels: np.ndarray, prev,
                        threshold: float = 0.5, with_logits: bool = True):
        logits_sxs = geometry.logits_to_input_frame(self._timed_decode(state, coords, labels, prev), self.cfg.input_size)
        mask, logits = geometry.to_image(logits_sxs, frame, logit_cut(threshold), with_logits, self._strip_elements)
        return mask, logits, geometry.feedback(logits_sxs, frame)

    @torch.inference_mode()
    def decode_prompts(self, state, coords: np.ndarray, labels: np.ndarray) -> torch.Tensor:
        """SAT: prompts and the empty previous mask made on the device; logits stay there."""
        return self._timed_decode(state, coords, labels, self.empty_prev(len(coords)))

    def state_to_numpy(self, state) -> dict[str, np.ndarray]:
        return {k: v.float().cpu().numpy() for k, v in state._asdict().items()}

    def state_from_numpy(self, arrays: dict[str, np.ndarray]):
        def tensor(name):
            dtype = torch.float32 if name == "depth" else self.model.dtype
            return torch.from_numpy(np.ascontiguousarray(arrays[name], np.float32)).to(self.torch_device, dtype)

        return ImageState(*(tensor(name) for name in ImageState._fields))


def device_type(name: str, backend: str) -> str:
    """cpu or cuda, the device types these backends run on; anything else is refused."""
    try:
        kind = torch.device(name).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise UserError(f"device must be cpu or cuda (cuda:N) for the {backend} backend, not {name!r}")
    return kind


def open_runner(spec) -> TorchRunner:
    device = spec.device or ("cuda" if spec.backend == "torch-cuda" else "cpu")
    kind = device_type(device, spec.backend)
    if spec.backend == "torch-cuda":
        if kind != "cuda":
            raise UserError(f"backend torch-cuda runs on a CUDA GPU, not on {device!r}; the torch backend runs on the CPU")
        if not torch.cuda.is_available():
            raise UserError("backend torch-cuda needs a CUDA GPU and a CUDA build of PyTorch; none found here")
    if spec.export_dir is not None:
        model, notes = reference_model(read_manifest(spec.export_dir), spec.checkpoint), [f"weights: those of {spec.export_dir}"]
    else:
        model, report = load_model(spec.model, spec.checkpoint)
        notes = describe_weights(report)
    if spec.order_attention is not None:
        try:
            model.set_order_attention(spec.order_attention)
        except ValueError as e:
            raise UserError(str(e)) from None
        notes.append(f"order-aware attention: {spec.order_attention}")
    if spec.precision == "fp16":
        from ..model.precision import to_fp16

        model = to_fp16(model)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    runner = TorchRunner(model, device, notes=notes)
    runner.name = spec.backend
    return runner
