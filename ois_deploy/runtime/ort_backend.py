"""ONNX Runtime backends (ort, ort-cuda, ort-trt): the exported encoder and decoder graphs.

Providers are chosen automatically (TensorRT, then CUDA execution provider when
onnxruntime-gpu is installed, else CPU) or asked for (ort-cuda, ort-trt); a session that ONNX
Runtime opened on another provider than the first asked for is refused (check_provider). On a GPU
the encoder's outputs stay in device memory between clicks through IO binding. fp32 and fp16
graphs share this code: input dtypes are read from the sessions.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..contract import (
    DECODER_OUTPUTS,
    MAX_PROMPTS,
    ENCODER_OUTPUTS,
    check_graph,
    check_metadata,
    graph_file,
    manifest_config,
    read_manifest,
    state_shapes,
    weights_notes,
)
from ..errors import UserError, first_line
from ..presets import OISConfig
from .base import Runner
from .batching import split_decode
from .profiles import INTERACTIVE, SAT, decoder_profiles, encoder_profile
from .profiling import NodeTime, summarise

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
PROFILE_NAMES = {INTERACTIVE: "interactive", SAT: "sat"}
# Why a session may come up on another provider than asked: what that provider loads at session time.
PROVIDER_NEEDS = {
    "CUDAExecutionProvider": "the CUDA provider did not load: onnxruntime-gpu 1.22 needs CUDA 12 and cuDNN 9 "
                             "(a CUDA 12 build of PyTorch brings both)",
    "TensorrtExecutionProvider": "the TensorRT provider did not load: onnxruntime-gpu 1.22 needs TensorRT 10.9 "
                                 "(pip install 'ois-deploy[gpu]') and CUDA 12",
}


def shapes_option(shapes: dict[str, tuple[int, ...]]) -> str:
    """ONNX Runtime's profile-shape syntax: name:AxBxC,name2:..."""
    return ",".join(f"{name}:{'x'.join(map(str, dims))}" for name, dims in shapes.items())


def tensorrt_provider_options(cfg: OISConfig, export_dir: Path, role: str, profile: int = INTERACTIVE,
                              max_prompts: int = MAX_PROMPTS) -> dict[str, str]:
    """Options of ONNX Runtime's TensorRT provider for one graph and one shape profile: explicit
    min/opt/max shapes for the dynamic inputs (so that an engine is built once, not per new
    shape), engines cached per profile in DIR/ort-trt-cache/<profile> (the provider rebuilds a
    cached engine whose recorded profile differs, so two profiles must not share one cache), one
    timing cache for all. Precision comes from the graph (fp16 graphs with FP32 islands), as in
    `build`."""
    shapes = encoder_profile(cfg) if role == "encoder" else decoder_profiles(cfg, cfg.decoder.max_clicks, max_prompts)[profile]
    state = state_shapes(cfg)  # the image state is static (batch 1); everything else has dynamic axes
    dynamic = {name: p for name, p in shapes.items() if name not in state}
    cache = export_dir / TRT_CACHE_DIR
    return {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache / (role if role == "encoder" else PROFILE_NAMES[profile])),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache),
        "trt_fp16_enable": "False",
        "trt_profile_min_shapes": shapes_option({n: p[0] for n, p in dynamic.items()}),
        "trt_profile_opt_shapes": shapes_option({n: p[1] for n, p in dynamic.items()}),
        "trt_profile_max_shapes": shapes_option({n: p[2] for n, p in dynamic.items()}),
    }


# FP32 means IEEE FP32 (docs/design.md §7): the CUDA provider's TF32 default puts FP32 graphs over
# verify's 1e-4, and FP16 graphs' FP32 islands would lose the precision they are there for.
CUDA_OPTIONS = {"use_tf32": "0"}


def session_providers(providers: list[str], cfg: OISConfig, export_dir: Path, role: str,
                      profile: int = INTERACTIVE) -> list:
    """The provider list of one session, each GPU provider with its options."""
    options = {"TensorrtExecutionProvider": lambda: tensorrt_provider_options(cfg, export_dir, role, profile),
               "CUDAExecutionProvider": lambda: dict(CUDA_OPTIONS)}
    return [(name, options[name]()) if name in options else name for name in providers]


def check_provider(active: list[str], asked: str, path: Path) -> None:
    """Refuse a session that ONNX Runtime put on another provider than the one asked for: it
    skips a provider whose libraries do not load and retries a failed one on the next provider
    down, both with at most a log line, and the figures would be another provider's."""
    if not active or active[0] != asked:
        got = active[0] if active else "no provider"
        raise UserError(f"ONNX Runtime opened {path.name} on {got}, not the {asked} asked for: "
                        f"{PROVIDER_NEEDS.get(asked, 'that provider did not load')}")


def open_session(ort, path: Path, options, providers: list, check: bool = True) -> Any:
    """An InferenceSession on the first of providers or UserError, never a silent fallback
    (check=False: on whichever of them ONNX Runtime could load, for the automatic choice)."""
    asked = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
    try:
        # enable_fallback=0: a provider that fails raises here (and in run()) instead of ONNX
        # Runtime printing the error and retrying on the next provider down.
        session = ort.InferenceSession(str(path), options, providers=providers, enable_fallback=0)
    except Exception as e:
        raise UserError(f"cannot load {path} on {asked}: {first_line(e)}") from None
    if check:
        check_provider(session.get_providers(), asked, path)
    return session


def load_gpu_libraries(ort) -> None:
    """CUDA and cuDNN for onnxruntime-gpu from the pip packages a CUDA PyTorch installs
    (onnxruntime.preload_dlls, 1.21+); whatever it cannot find, check_provider reports."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                preload()
            except Exception:  # noqa: BLE001 - best effort; the session check says what is missing
                pass


BACKEND_PROVIDERS = {"ort": None, "ort-cuda": "cuda", "ort-trt": "tensorrt"}


class OrtRunner(Runner):
    """One session per graph (the TensorRT provider: one decoder session per shape profile).
    ONNX Runtime sessions may be run from several threads at once."""

    name = "ort"

    def __init__(self, export_dir: str | Path, precision: str = "fp32", providers: str = "auto", threads: int = 0,
                 profile: bool = False):
        ort = import_ort()
        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(self.export_dir)
        if precision not in self.manifest["precisions"]:
            raise UserError(f"{export_dir} has no {precision} graphs (it has {', '.join(self.manifest['precisions'])})")
        self.providers = choose_providers(providers)
        cfg = manifest_config(self.manifest)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        if self.providers[0] != "CPUExecutionProvider":
            load_gpu_libraries(ort)
        if "TensorrtExecutionProvider" in self.providers:
            if precision == "fp32":  # the provider has no TF32 switch; NVIDIA's libraries honour this one
                os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")
            for folder in ("encoder", *PROFILE_NAMES.values()):
                (self.export_dir / TRT_CACHE_DIR / folder).mkdir(parents=True, exist_ok=True)
        # Asked for a provider: refused elsewhere; auto: whatever the first session got, for all.
        check = providers != "auto"
        self.sessions, self.decoders = {}, {}
        for role in ("encoder", "decoder"):
            path = self.export_dir / graph_file(role, precision)
            check_graph(path, self.manifest)
            options.enable_profiling = profile and role == "decoder"  # read by profile_decode
            if options.enable_profiling:
                options.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="ois-ort-profile-")) / "decoder")
            # The TensorRT provider runs only the first of several profiles: a session per profile.
            for shape_profile in (INTERACTIVE, SAT) if role == "decoder" and self._on_tensorrt() else (INTERACTIVE,):
                session = open_session(ort, path, options, session_providers(self.providers, cfg, self.export_dir, role, shape_profile),
                                       check)
                check_metadata(path, session.get_modelmeta().custom_metadata_map, self.manifest, role, precision)
                self.sessions.setdefault(role, session)
                if role == "encoder":  # the decoder asks for what the encoder got
                    self.providers = [p for p in self.providers if p in session.get_providers()]
                else:
                    self.decoders[shape_profile] = session
        # Where the sessions actually run, not what was asked for.
        self.active_provider = self.providers[0]
        on_gpu = self.active_provider != "CPUExecutionProvider"
        super().__init__(cfg, precision, "cuda" if on_gpu else "cpu", weights_notes(self.manifest))
        self.input_types = {i.name: NUMPY_TYPES[i.type] for s in self.sessions.values() for i in s.get_inputs()}

    def _on_tensorrt(self) -> bool:
        return self.providers[0] == "TensorrtExecutionProvider"

    def close(self) -> None:
        self.sessions, self.decoders = {}, {}

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
        if len(self.decoders) == 1:  # dynamic axes: any (P, N) in one call
            return self._decode_on(self.decoders[INTERACTIVE], state, coords, labels, prev_mask)
        return split_decode(lambda c, l, p, profile: self._decode_on(self.decoders[profile], state, c, l, p),
                            coords, labels, prev_mask, self.cfg.decoder.max_clicks, MAX_PROMPTS)

    def _decode_on(self, session, state, coords: np.ndarray, labels: np.ndarray, prev_mask: np.ndarray) -> np.ndarray:
        clicks = {
            "point_coords": self._feed("point_coords", coords),
            "point_labels": self._feed("point_labels", labels),
            "prev_mask": self._feed("prev_mask", prev_mask),
        }
        if not self.on_gpu:
            return session.run(list(DECODER_OUTPUTS), {**state, **clicks})[0].astype(np.float32, copy=False)
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
    fixed = BACKEND_PROVIDERS[spec.backend]  # ort-cuda, ort-trt: the provider is the backend's
    if fixed and spec.device not in (None, fixed, "cuda"):
        raise UserError(f"backend {spec.backend} runs on the {fixed} provider of a CUDA GPU, not on {spec.device!r}")
    providers = fixed or spec.device or "auto"
    runner = OrtRunner(spec.export_dir, spec.precision, providers=providers, threads=spec.threads,
                       profile=spec.profile)
    runner.name = spec.backend
    return runner
