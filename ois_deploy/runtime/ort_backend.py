"""ONNX Runtime backends (ort, ort-cuda, ort-trt): the exported encoder and decoder graphs.

Providers are chosen automatically (TensorRT, then CUDA execution provider when
onnxruntime-gpu is installed, else CPU). On a GPU the encoder's outputs stay in device memory
between clicks through IO binding. fp32 and fp16 graphs share this code: input dtypes are read
from the sessions.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ..contract import (
    DECODER_OUTPUTS,
    ENCODER_OUTPUTS,
    check_graph,
    check_metadata,
    graph_file,
    manifest_config,
    read_manifest,
    state_shapes,
    weights_notes,
)
from ..errors import UserError
from ..presets import OISConfig
from .base import Runner
from .profiling import NodeTime, summarise
from .profiles import decoder_profiles, encoder_profile, union_profile

PROVIDER_CHOICES = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
               "tensor(int64)": np.int64}


def import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise UserError("onnxruntime is not installed: pip install 'ois-deploy[cpu]' (or [gpu])") from None
    return onnxruntime


def choose_providers(kind: str = "auto") -> list[str]:
    available = import_ort().get_available_providers()
    if kind == "auto":
        for name in ("tensorrt", "cuda", "cpu"):
            if PROVIDER_CHOICES[name][0] in available:
                return [p for p in PROVIDER_CHOICES[name] if p in available]
    if kind not in PROVIDER_CHOICES:
        raise UserError(f"unknown ONNX Runtime provider {kind!r}; choose auto, cpu, cuda or tensorrt")
    if PROVIDER_CHOICES[kind][0] not in available:
        raise UserError(
            f"ONNX Runtime has no {PROVIDER_CHOICES[kind][0]} here (available: {', '.join(available)}); "
            "install onnxruntime-gpu, without onnxruntime, on a CUDA machine"
        )
    return [p for p in PROVIDER_CHOICES[kind] if p in available]


TRT_CACHE_DIR = "ort-trt-cache"


def shapes_option(shapes: dict[str, tuple[int, ...]]) -> str:
    """ONNX Runtime's profile-shape syntax: name:AxBxC,name2:..."""
    return ",".join(f"{name}:{'x'.join(map(str, dims))}" for name, dims in shapes.items())


def tensorrt_provider_options(cfg: OISConfig, export_dir: Path, role: str, max_prompts: int = 256) -> dict[str, str]:
    """Options of ONNX Runtime's TensorRT provider for one graph: engine and timing caches in
    DIR/ort-trt-cache (ONNX Runtime rebuilds a cached engine when graph or profile changes),
    and explicit profiles for the dynamic inputs, so that engines are built once, not per new
    shape. Precision comes from the graph (fp16 graphs with FP32 islands), as in `build`."""
    if role == "encoder":
        profile = encoder_profile(cfg)
    else:
        profile = union_profile(decoder_profiles(cfg, cfg.decoder.max_clicks, max_prompts))
    state = state_shapes(cfg)  # the image state is static (batch 1); everything else has dynamic axes
    dynamic = {name: p for name, p in profile.items() if name not in state}
    cache = str(export_dir / TRT_CACHE_DIR)
    return {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": cache,
        "trt_fp16_enable": "False",
        "trt_profile_min_shapes": shapes_option({n: p[0] for n, p in dynamic.items()}),
        "trt_profile_opt_shapes": shapes_option({n: p[1] for n, p in dynamic.items()}),
        "trt_profile_max_shapes": shapes_option({n: p[2] for n, p in dynamic.items()}),
    }


def session_providers(providers: list[str], cfg: OISConfig, export_dir: Path, role: str) -> list:
    """The provider list of one session, with the TensorRT provider's options attached."""
    return [
        (name, tensorrt_provider_options(cfg, export_dir, role)) if name == "TensorrtExecutionProvider" else name
        for name in providers
    ]


BACKEND_PROVIDERS = {"ort": None, "ort-cuda": "cuda", "ort-trt": "tensorrt"}


class OrtRunner(Runner):
    """One session per graph. ONNX Runtime sessions may be run from several threads at once."""

    name = "ort"

    def __init__(self, export_dir: str | Path, precision: str = "fp32", providers: str = "auto", threads: int = 0,
                 profile: bool = False):
        ort = import_ort()
        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(self.export_dir)
        if precision not in self.manifest["precisions"]:
            raise UserError(f"{export_dir} has no {precision} graphs (it has {', '.join(self.manifest['precisions'])})")
        self.providers = choose_providers(providers)
        on_gpu = self.providers[0] != "CPUExecutionProvider"
        super().__init__(manifest_config(self.manifest), precision, "cuda" if on_gpu else "cpu",
                         weights_notes(self.manifest))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.sessions = {}
        if "TensorrtExecutionProvider" in self.providers:
            (self.export_dir / TRT_CACHE_DIR).mkdir(exist_ok=True)
        for role in ("encoder", "decoder"):
            path = self.export_dir / graph_file(role, precision)
            check_graph(path, self.manifest)
            providers = session_providers(self.providers, self.cfg, self.export_dir, role)
            options.enable_profiling = profile and role == "decoder"  # read by profile_decode
            if options.enable_profiling:
                options.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="ois-ort-profile-")) / "decoder")
            try:
                self.sessions[role] = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as e:
                raise UserError(f"cannot load {path}: {str(e).strip().splitlines()[0]}") from None
            check_metadata(path, self.sessions[role].get_modelmeta().custom_metadata_map, self.manifest, role, precision)
        self.input_types = {i.name: NUMPY_TYPES[i.type] for s in self.sessions.values() for i in s.get_inputs()}

    def close(self) -> None:
        self.sessions = {}

    def _feed(self, name: str, value: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(value, dtype=self.input_types[name])

    def _encode(self, image: np.ndarray):
        session = self.sessions["encoder"]
        if not self.on_gpu:
            return dict(zip(ENCODER_OUTPUTS, session.run(list(ENCODER_OUTPUTS), {"image": self._feed("image", image)})))
        binding = session.io_binding()
        binding.bind_cpu_input("image", self._feed("image", image))
        for name in ENCODER_OUTPUTS:
            binding.bind_output(name, "cuda")  # stays on the GPU for every click
        session.run_with_iobinding(binding)
        return dict(zip(ENCODER_OUTPUTS, binding.get_outputs()))

    def _decode(self, state, coords: np.ndarray, labels: np.ndarray, prev_mask: np.ndarray) -> np.ndarray:
        session = self.sessions["decoder"]
        clicks = {
            "point_coords": self._feed("point_coords", coords),
            "point_labels": self._feed("point_labels", labels),
            "prev_mask": self._feed("prev_mask", prev_mask),
        }
        if not self.on_gpu:
            return session.run(list(DECODER_OUTPUTS), {**state, **clicks})[0].astype(np.float32)
        binding = session.io_binding()
        for name, value in state.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        for name, value in clicks.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output("mask_logits", "cpu")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0].astype(np.float32)

    def profile_decode(self, state, coords: np.ndarray, labels: np.ndarray, prev_mask: np.ndarray, calls: int) -> dict:
        """ONNX Runtime's profiler over `calls` decoder calls after one warm-up call: each node's
        kernel time by op type. The profile ends here (ONNX Runtime profiles a session once)."""
        session = self.sessions["decoder"]
        if not session.get_session_options().enable_profiling:
            raise UserError("open the ort runner with profile=True to profile its decoder")
        self.decode(state, coords, labels, prev_mask)
        walls = []
        for _ in range(calls):
            start = time.perf_counter()
            self.decode(state, coords, labels, prev_mask)
            walls.append((time.perf_counter() - start) * 1000)
        path = Path(session.end_profiling())
        if not path.is_file():
            raise UserError("this decoder session's profile was already read: open the runner again")
        trace = json.loads(path.read_text())
        shutil.rmtree(path.parent, ignore_errors=True)
        runs = [e for e in trace if e.get("name") == "model_run"][-calls:]  # the timed calls, not the warm-up
        start = runs[0]["ts"] if runs else 0
        events = [NodeTime(e["name"].removesuffix("_kernel_time"), e["args"].get("op_name", "?"), e["args"].get("provider", "?"),
                           e["dur"] / 1000)
                  for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start]
        return summarise(events, calls, walls, f"ONNX Runtime {import_ort().__version__} {self.providers[0]} ({self.precision})")

    def state_to_numpy(self, state) -> dict[str, np.ndarray]:
        return {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v, np.float32) for k, v in state.items()}

    def state_from_numpy(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: self._feed(k, v) for k, v in arrays.items()}


def open_runner(spec) -> OrtRunner:
    providers = BACKEND_PROVIDERS[spec.backend] or spec.device or "auto"
    runner = OrtRunner(spec.export_dir, spec.precision, providers=providers, threads=spec.threads,
                       profile=spec.profile)
    runner.name = spec.backend
    return runner
