"""TensorRT engines of the exported graphs, built and run through Polygraphy's backend API.

Networks are strongly typed: precision comes from the graph, so the FP32 islands of the fp16
graphs survive, and one code path serves TensorRT 10 and 11 (11 has no FP16 builder flag).
The decoder engine has two optimisation profiles: interactive (P = 1, N = 1..max clicks) and
SAT (P = 1..max prompts, N = 1); the runner picks one per call. tensorrt is imported only here,
and only when an engine is built or run.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..io import atomic_write_bytes
from ..exporters.onnx_export import ENCODER_OUTPUTS, graph_file, read_manifest, write_manifest
from ..model import OISConfig
from ..provenance import now_utc, sha256_file
from .ort import check_graph
from .profiles import INTERACTIVE, decoder_profiles, encoder_profile, select_profile

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


def build_engines(
    export_dir: str | Path,
    precision: str = "fp16",
    max_clicks: int | None = None,
    max_prompts: int = 256,
    timing_cache: str | None = None,
    workspace_gib: float | None = None,
    opt_level: int | None = None,
    rebuild: bool = False,
    progress=None,
) -> dict:
    """Build encoder.plan and decoder.plan from the precision's graphs; record them in the manifest."""
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    cfg = OISConfig.from_dict(manifest["config"])
    max_clicks = max_clicks or cfg.decoder.max_clicks
    profiles = {"encoder": [encoder_profile(cfg)], "decoder": decoder_profiles(cfg, max_clicks, max_prompts)}
    if precision not in manifest["precisions"]:
        raise UserError(f"{export_dir} has no {precision} graphs: export with --precision {precision} or both")
    if opt_level is not None and not 0 <= opt_level <= 5:
        raise UserError("--opt-level must be 0..5")
    trt = import_tensorrt()
    runtime = runtime_info()
    graphs = {role: export_dir / graph_file(role, precision) for role in ENGINE_FILES}
    for path in graphs.values():
        check_graph(path, manifest)
    hashes = {path.name: manifest["graphs"][path.name]["sha256"] for path in graphs.values()}
    old = manifest.get("engines")
    if old and not rebuild and old.get("precision") == precision and not engine_mismatches(old, runtime, hashes):
        return manifest  # up to date

    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    step = progress or (lambda text: None)
    files, seconds = {}, {}
    for role, path in graphs.items():
        step(f"build {ENGINE_FILES[role]} from {path.name}")
        trt_profiles = []
        for shapes in profiles[role]:
            profile = Profile()
            for name, (lo, opt, hi) in shapes.items():
                profile.add(name, min=lo, opt=opt, max=hi)
            trt_profiles.append(profile)
        options = {"profiles": trt_profiles, "load_timing_cache": timing_cache}
        if workspace_gib:
            options["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: int(workspace_gib * 1024**3)}
        if opt_level is not None:
            options["builder_optimization_level"] = opt_level
        start = time.perf_counter()
        try:
            network = NetworkFromOnnxPath(str(path), strongly_typed=True)
            data = EngineBytesFromNetwork(network, CreateConfig(**options), save_timing_cache=timing_cache)()
        except Exception as e:
            raise UserError(f"TensorRT could not build {path.name}: {str(e).strip().splitlines()[0]}") from None
        seconds[role] = round(time.perf_counter() - start, 1)
        target = export_dir / ENGINE_FILES[role]
        atomic_write_bytes(target, bytes(data))
        files[target.name] = sha256_file(target)
    manifest["engines"] = {
        **runtime,
        "precision": precision,
        "graphs": hashes,
        "files": files,
        "profiles": {role: [{k: [list(s) for s in v] for k, v in p.items()} for p in ps] for role, ps in profiles.items()},
        "max_clicks": max_clicks,
        "max_prompts": max_prompts,
        "flags": {"strongly_typed": True, "workspace_gib": workspace_gib, "opt_level": opt_level,
                  "timing_cache": timing_cache},
        "build_seconds": seconds,
        "date": now_utc(),
    }
    write_manifest(export_dir, manifest)
    return manifest


class TrtRunner:
    """Engines deserialised once; tensors bound by name; the image state stays on the GPU."""

    name = "trt"
    on_gpu = True
    device = "cuda"

    def __init__(self, export_dir: str | Path):
        import_tensorrt()
        self.torch = require_cuda()
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes
        from polygraphy.backend.trt import TrtRunner as PolygraphyTrtRunner

        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(self.export_dir)
        self.engine_info = check_engines(self.manifest, runtime_info(), self.export_dir)
        self.cfg = OISConfig.from_dict(self.manifest["config"])
        self.runners = {}
        for role, name in ENGINE_FILES.items():
            engine = EngineFromBytes(BytesFromPath(str(self.export_dir / name)))()
            self.runners[role] = PolygraphyTrtRunner(engine, allocation_strategy="static")
            self.runners[role].activate()
        self.profile = INTERACTIVE

    def close(self) -> None:
        for runner in self.runners.values():
            runner.deactivate()

    def encode(self, image: np.ndarray):
        feed = {"image": self.torch.from_numpy(np.ascontiguousarray(image, np.float32)).cuda()}
        return self.runners["encoder"].infer(feed, copy_outputs_to_host=False)

    def decode(self, state, coords: np.ndarray, labels: np.ndarray, prev_mask: np.ndarray) -> np.ndarray:
        info = self.engine_info
        profile = select_profile(coords.shape[0], coords.shape[1], info["max_clicks"], info["max_prompts"])
        runner = self.runners["decoder"]
        if profile != self.profile:
            runner.set_profile(profile)
            self.profile = profile
        t = self.torch
        feed = {name: state[name] for name in ENCODER_OUTPUTS}
        feed["point_coords"] = t.from_numpy(np.ascontiguousarray(coords, np.float32)).cuda()
        feed["point_labels"] = t.from_numpy(np.ascontiguousarray(labels, np.int32)).cuda()
        feed["prev_mask"] = t.from_numpy(np.ascontiguousarray(prev_mask, np.float32)).cuda()
        out = runner.infer(feed, copy_outputs_to_host=False)["mask_logits"]
        return out.float().cpu().numpy()

    def state_to_numpy(self, state) -> dict[str, np.ndarray]:
        return {k: v.float().cpu().numpy() for k, v in state.items()}

    def weights_notes(self) -> list[str]:
        e = self.engine_info
        return [f"engines: {e['precision']} TensorRT {e['tensorrt']} on {e['gpu']}"]
