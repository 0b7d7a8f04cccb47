"""Backend name -> its module, capabilities and the extra that installs it.

Adding a backend: one module in this package with a Runner subclass and an `open_runner(spec)`
function, and one entry below. Modules are imported only when their backend is opened, so a
runtime without PyTorch never imports it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from ..contract import is_export_folder
from ..errors import UserError
from ..presets import PRESETS
from .base import Runner


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # ois_deploy.runtime.<module>, with open_runner(spec)
    needs_export: bool  # runs an export folder's graphs (else a preset, or an export's reference model)
    needs_gpu: bool
    precisions: tuple[str, ...]
    extra: str  # pip install 'ois-deploy[extra]'
    summary: str


# The int8 decoders an export can hold: the QDQ graph (every backend's int8) and, where nncf was
# installed at export, OpenVINO's own NNCF-quantised IR (docs/design.md §4.3).
INT8_DECODERS = ("qdq", "nncf")


@dataclass(frozen=True)
class RunnerSpec:
    """What to open: model is a preset name or an export folder."""

    backend: str
    model: str
    precision: str = "fp32"
    checkpoint: str | None = None
    device: str | None = None  # torch, aoti: cpu/cuda; ort: auto/cpu/cuda/tensorrt (ONNX Runtime providers)
    threads: int = 0  # intra-op threads (0: the backend's default)
    order_attention: str | None = None  # override of the model's mode (torch backends; ablations)
    streams: int = 0  # openvino: NUM_STREAMS (0: what its LATENCY hint picks)
    profile: bool = False  # openvino, ort: collect per-node times for Runner.profile_decode
    int8_decoder: str = "qdq"  # openvino int8: the export's QDQ decoder or OpenVINO's own (nncf)

    @property
    def export_dir(self) -> Path | None:
        return Path(self.model) if is_export_folder(self.model) else None


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("torch", "torch_backend", False, False, ("fp32", "fp16"), "export", "PyTorch reference model"),
        Backend("torch-cuda", "torch_backend", False, True, ("fp32", "fp16"), "export", "PyTorch on a CUDA GPU, CUDA graphs per click"),
        Backend("ort", "ort_backend", True, False, ("fp32", "fp16", "int8"), "cpu", "ONNX Runtime, providers chosen automatically"),
        Backend("ort-cuda", "ort_backend", True, True, ("fp32", "fp16"), "gpu", "ONNX Runtime, CUDA execution provider"),
        Backend("ort-trt", "ort_backend", True, True, ("fp32", "fp16"), "gpu", "ONNX Runtime, TensorRT execution provider"),
        Backend("trt", "trt_backend", True, True, ("fp32", "fp16"), "gpu", "TensorRT engines (ois-deploy build)"),
        Backend("aoti", "aoti_backend", True, False, ("fp32", "fp16"), "export",
                "AOTInductor packages (ois-deploy build --engine aoti), CPU or CUDA"),
        Backend("openvino", "openvino_backend", True, False, ("fp32", "bf16", "int8"), "openvino",
                "OpenVINO on the CPU: fp32, bf16 (AVX512-BF16/AMX), int8 (the QDQ graphs; --int8-decoder nncf)"),
        Backend("ort-web", "ort_web_backend", True, False, ("fp32", "fp16"), "dev",
                "Decoder in headless Chromium through onnxruntime-web (WASM), encoder in ONNX Runtime; parity"),
    )
}


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise UserError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}") from None


def default_backend(model: str) -> str:
    return "ort" if is_export_folder(model) else "torch"


def open_runner(spec: RunnerSpec) -> Runner:
    """The runner of spec.backend for spec.model, after the checks every backend shares."""
    backend = check_spec(spec)
    module = importlib.import_module(f"{__package__}.{backend.module}")
    return module.open_runner(spec)


def check_spec(spec: RunnerSpec) -> Backend:
    """The checks every backend shares, without opening anything (UserError if one fails)."""
    backend = get_backend(spec.backend)
    if spec.precision not in backend.precisions:
        raise UserError(f"precision must be one of {', '.join(backend.precisions)} for {backend.name}, not {spec.precision!r}")
    model = Path(spec.model)
    if not model.exists() and spec.model not in PRESETS and (len(model.parts) > 1 or spec.model.startswith(".")
                                                             or spec.model.endswith("/")):
        raise UserError(f"export folder not found: {spec.model}")  # a path, not a preset name
    if model.is_dir() and not is_export_folder(model):
        raise UserError(f"{spec.model} is a folder without manifest.json: not an export folder")
    if backend.needs_export and spec.export_dir is None:
        raise UserError(f"backend {backend.name} needs an export folder, and {spec.model!r} is not one "
                        "(ois-deploy export --out DIR)")
    if spec.order_attention is not None and backend.module != "torch_backend":
        raise UserError("an order-attention override applies to the torch backends only (graphs fix it at export)")
    if spec.int8_decoder not in INT8_DECODERS:
        raise UserError(f"int8 decoder must be one of {', '.join(INT8_DECODERS)}, not {spec.int8_decoder!r}")
    if spec.int8_decoder != "qdq" and (backend.name != "openvino" or spec.precision != "int8"):
        raise UserError(f"the {spec.int8_decoder} int8 decoder applies to --backend openvino --precision int8 only")
    return backend
