"""TensorRT backend: engines built by `ois-deploy build`, deserialised once and run through
Polygraphy's TrtRunner; tensors bound by name, the image state kept on the GPU.

tensorrt (and PyTorch, for CUDA device buffers) are imported only when this backend is opened.
The decoder engine has two profiles (interactive, SAT); the runner picks one per call.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..contract import ENCODER_OUTPUTS, manifest_config, read_manifest
from ..errors import UserError
from ..provenance import sha256_file
from .base import Runner
from .profiles import INTERACTIVE, select_profile

ENGINE_FILES = {"encoder": "encoder.plan", "decoder": "decoder.plan"}
INSTALL_HINT = "on a CUDA machine: pip install tensorrt polygraphy (TensorRT comes from NVIDIA's package index)"


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise UserError(f"TensorRT is not installed here; {INSTALL_HINT}") from None
    return tensorrt


def require_cuda():
    try:
        import torch
    except ImportError:
        raise UserError("the TensorRT backend needs PyTorch with CUDA for device buffers") from None
    if not torch.cuda.is_available():
        raise UserError("the TensorRT backend needs a CUDA GPU; none is visible here")
    return torch


def runtime_info() -> dict:
    """What an engine is tied to: GPU, compute capability, TensorRT and CUDA versions."""
    trt = import_tensorrt()
    torch = require_cuda()
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "tensorrt": trt.__version__,
        "cuda": torch.version.cuda,
    }


def engine_mismatches(entry: dict, runtime: dict, graph_hashes: dict[str, str]) -> list[str]:
    """Why recorded engines cannot run here; empty if they can."""
    problems = [
        f"{key} is {runtime[key]!r} here but the engines were built for {entry.get(key)!r}"
        for key in ("gpu", "compute_capability", "tensorrt")
        if entry.get(key) != runtime.get(key)
    ]
    for name, digest in entry.get("graphs", {}).items():
        if graph_hashes.get(name) != digest:
            problems.append(f"{name} changed since the engines were built")
    return problems


def check_engines(manifest: dict, runtime: dict, export_dir: Path) -> dict:
    entry = manifest.get("engines")
    if not entry:
        raise UserError(f"no TensorRT engines in {export_dir}: run ois-deploy build {export_dir}")
    hashes = {name: info["sha256"] for name, info in manifest["graphs"].items()}
    problems = engine_mismatches(entry, runtime, hashes)
    if problems:
        raise UserError(f"engines in {export_dir} do not fit: {problems[0]}; run ois-deploy build {export_dir} --rebuild")
    for name in ENGINE_FILES.values():
        path = export_dir / name
        if not path.is_file() or sha256_file(path) != entry["files"].get(name):
            raise UserError(f"{path} is missing or does not match the manifest; run ois-deploy build --rebuild")
    return entry



class TrtRunner(Runner):
    """Engines deserialised once; tensors bound by name; the image state stays on the GPU.
    One Polygraphy runner per engine holds one execution context: not shared across threads."""

    name = "trt"
    thread_safe = False

    def __init__(self, export_dir: str | Path):
        import_tensorrt()
        self.torch = require_cuda()
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes
        from polygraphy.backend.trt import TrtRunner as PolygraphyTrtRunner

        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(self.export_dir)
        self.engine_info = check_engines(self.manifest, runtime_info(), self.export_dir)
        e = self.engine_info
        super().__init__(manifest_config(self.manifest), e["precision"], "cuda",
                         [f"engines: {e['precision']} TensorRT {e['tensorrt']} on {e['gpu']}"])
        self.runners = {}
        for role, name in ENGINE_FILES.items():
            engine = EngineFromBytes(BytesFromPath(str(self.export_dir / name)))()
            self.runners[role] = PolygraphyTrtRunner(engine, allocation_strategy="static")
            self.runners[role].activate()
        self.profile = INTERACTIVE

    def close(self) -> None:
        for runner in self.runners.values():
            runner.deactivate()
        self.runners = {}

    def synchronize(self) -> None:
        self.torch.cuda.synchronize()

    def _cuda(self, array: np.ndarray, dtype):
        return self.torch.from_numpy(np.ascontiguousarray(array, dtype)).cuda()

    def _encode(self, image: np.ndarray):
        return self.runners["encoder"].infer({"image": self._cuda(image, np.float32)}, copy_outputs_to_host=False)

    def _decode(self, state, coords: np.ndarray, labels: np.ndarray, prev_mask: np.ndarray) -> np.ndarray:
        info = self.engine_info
        profile = select_profile(coords.shape[0], coords.shape[1], info["max_clicks"], info["max_prompts"])
        runner = self.runners["decoder"]
        if profile != self.profile:
            runner.set_profile(profile)
            self.profile = profile
        feed = {name: state[name] for name in ENCODER_OUTPUTS}
        feed["point_coords"] = self._cuda(coords, np.float32)
        feed["point_labels"] = self._cuda(labels, np.int32)
        feed["prev_mask"] = self._cuda(prev_mask, np.float32)
        out = runner.infer(feed, copy_outputs_to_host=False)["mask_logits"]
        return out.float().cpu().numpy()

    def state_to_numpy(self, state) -> dict[str, np.ndarray]:
        return {k: v.float().cpu().numpy() for k, v in state.items()}

    def state_from_numpy(self, arrays: dict[str, np.ndarray]):
        dtype = self.torch.float16 if self.precision == "fp16" else self.torch.float32
        return {k: self.torch.from_numpy(np.ascontiguousarray(v, np.float32)).cuda().to(
            self.torch.float32 if k == "depth" else dtype) for k, v in arrays.items()}


def open_runner(spec) -> TrtRunner:
    # The engines carry their own precision (one per build); the runner reports it.
    return TrtRunner(spec.export_dir)
