"""ONNX Runtime backend: the exported encoder and decoder graphs behind the runner interface
(encode once per image, decode per click) that the Predictor and `verify` use.

Providers are chosen automatically (TensorRT, then CUDA execution provider when
onnxruntime-gpu is installed, else CPU). On a GPU the encoder's outputs stay in device memory
between clicks through IO binding. fp32 and fp16 graphs share this code: input dtypes are read
from the sessions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError
from ..exporters.onnx_export import DECODER_OUTPUTS, ENCODER_OUTPUTS, graph_file, read_manifest, state_shapes
from ..model import OISConfig
from ..provenance import sha256_file
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


def check_graph(path: Path, manifest: dict) -> None:
    """Refuse a graph that is not the one the manifest recorded (edited, swapped, corrupted)."""
    if not path.is_file():
        raise UserError(f"graph missing: {path}")
    recorded = manifest["graphs"].get(path.name, {}).get("sha256")
    if recorded is None:
        raise UserError(f"{path.name} is not listed in {path.parent}/manifest.json")
    if sha256_file(path) != recorded:
        raise UserError(f"{path} does not match its manifest (hash differs): re-export the folder")


def check_metadata(path: Path, meta: dict, manifest: dict, role: str, precision: str) -> None:
    """A graph must say it is this role and precision of this preset and these weights."""
    expected = {"ois.role": role, "ois.precision": precision, "ois.preset": manifest["preset"],
                "ois.model_hash": manifest["model_hash"]}
    for key, want in expected.items():
        if meta.get(key) != want:
            raise UserError(f"{path.name} has {key}={meta.get(key)!r} but the folder is for {want!r}: mixed exports")


class OrtRunner:
    def __init__(self, export_dir: str | Path, precision: str = "fp32", providers: str = "auto", threads: int = 0):
        ort = import_ort()
        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(self.export_dir)
        if precision not in self.manifest["precisions"]:
            raise UserError(f"{export_dir} has no {precision} graphs (it has {', '.join(self.manifest['precisions'])})")
        self.precision = precision
        self.cfg = OISConfig.from_dict(self.manifest["config"])
        self.providers = choose_providers(providers)
        self.on_gpu = self.providers[0] != "CPUExecutionProvider"
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
            try:
                self.sessions[role] = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as e:
                raise UserError(f"cannot load {path}: {str(e).strip().splitlines()[0]}") from None
            check_metadata(path, self.sessions[role].get_modelmeta().custom_metadata_map, self.manifest, role, precision)
        self.input_types = {i.name: NUMPY_TYPES[i.type] for s in self.sessions.values() for i in s.get_inputs()}
        self.device = "cuda" if self.on_gpu else "cpu"

    @property
    def name(self) -> str:
        return f"ort-{self.providers[0].replace('ExecutionProvider', '').lower()}"

    def _feed(self, name: str, value: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(value, dtype=self.input_types[name])

    def encode(self, image: np.ndarray):
        session = self.sessions["encoder"]
        if not self.on_gpu:
            return dict(zip(ENCODER_OUTPUTS, session.run(list(ENCODER_OUTPUTS), {"image": self._feed("image", image)})))
        binding = session.io_binding()
        binding.bind_cpu_input("image", self._feed("image", image))
        for name in ENCODER_OUTPUTS:
            binding.bind_output(name, "cuda")  # stays on the GPU for every click
        session.run_with_iobinding(binding)
        return dict(zip(ENCODER_OUTPUTS, binding.get_outputs()))

    def decode(self, state, coords: np.ndarray, labels: np.ndarray, prev_mask: np.ndarray) -> np.ndarray:
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
            binding.bind_ortvalue_input(name, value)
        for name, value in clicks.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output("mask_logits", "cpu")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0].astype(np.float32)

    def state_to_numpy(self, state) -> dict[str, np.ndarray]:
        return {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in state.items()}

    def weights_notes(self) -> list[str]:
        w = self.manifest.get("weights", {})
        if w.get("format") == "random":
            return [f"weights: graphs exported from random init (seed {w.get('seed', 0)}): outputs are meaningless"]
        return [f"weights: graphs exported from {w.get('path')} ({w.get('format')})"]
