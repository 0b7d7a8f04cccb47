"""TensorRT backend (trt): the engines `ois-deploy build` made, run through TensorRT's own runtime
API (Polygraphy builds and inspects them; its runner is a prototyping tool that creates its CUDA
stream through its own lookup of libcudart, which misses the CUDA runtime pip wheels ship).

Each engine is deserialised once with one execution context; every input and output is bound by
name to a CUDA tensor the runner owns, outputs freshly allocated per call, so an image state the
caller keeps is never a buffer the next call writes. The decoder engine has two optimisation
profiles (interactive, SAT), chosen per call; other batches are split over them (batching.py).
The runner is TorchRunner over the engines (as aoti's packages are), so the click loop around the
decoder runs on the GPU and only the mask, and logits where asked, come back to the host.

tensorrt and PyTorch (CUDA device buffers) are imported only when this backend is opened. The
TensorRT calls and where their Python bindings were read: docs/design.md §3.2.
"""

from __future__ import annotations

from pathlib import Path

from ..contract import manifest_config, read_manifest
from ..errors import UserError
from ..provenance import sha256_file
from .batching import split_decode
from .torch_backend import TorchRunner

ENGINE_FILES = {"encoder": "encoder.plan", "decoder": "decoder.plan"}
INSTALL_HINT = "on a CUDA machine: pip install 'ois-deploy[gpu]' (TensorRT 10.9 for CUDA 12, with a CUDA 12 PyTorch)"


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


# tensorrt.DataType (by name) -> torch dtype name; FP8, INT4, FP4 and E8M0 never occur at our engines' I/O.
TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
                "INT64": "int64", "BOOL": "bool", "UINT8": "uint8"}
ALIGNMENT = 256  # IExecutionContext::setTensorAddress: "The pointer must have at least 256-byte alignment."


def torch_dtype(trt_dtype):
    """The torch dtype of a TensorRT tensor type (a tensorrt.DataType or its name)."""
    import torch

    name = getattr(trt_dtype, "name", str(trt_dtype))
    if name not in TORCH_DTYPES:
        raise UserError(f"an engine tensor has TensorRT type {name}, which this runner does not bind; "
                        "rebuild the engines from the exported graphs (ois-deploy build --rebuild)")
    return getattr(torch, TORCH_DTYPES[name])


def bindable(tensor, dtype):
    """tensor as TensorRT may read it in place: dtype, contiguous, 256-byte aligned (a slice of a
    batch is not); else a fresh copy, which PyTorch's CUDA allocator aligns to 512 bytes."""
    if tensor.dtype == dtype and tensor.is_contiguous() and tensor.data_ptr() % ALIGNMENT == 0:
        return tensor
    import torch

    copy = torch.empty(tuple(tensor.shape), dtype=dtype, device=tensor.device)
    copy.copy_(tensor)
    return copy


class TrtEngine:
    """One deserialised engine and its one execution context. run() enqueues on a stream of its
    own, after the caller's stream and before it again: TensorRT documents the legacy default
    stream (PyTorch's default) as costing extra device synchronisations, and the caller's later
    work, or the allocator's reuse of freed inputs, must wait for the engine."""

    def __init__(self, trt, runtime, path: Path):
        import torch

        self.path = path
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise UserError(f"TensorRT could not deserialise {path}: run ois-deploy build {path.parent} --rebuild")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.stream = torch.cuda.Stream()
        self.profile = 0  # a new context runs profile 0 until told otherwise
        self.context = self.engine.create_execution_context()  # last: nothing after it can fail
        if self.context is None:
            self.engine = None
            raise UserError(f"TensorRT could not create an execution context for {path} (GPU memory?)")

    def run(self, feed: dict, profile: int = 0) -> dict:
        """Inputs by name (CUDA tensors) -> fresh output tensors by name, on the caller's stream."""
        import torch

        tensors = {name: bindable(feed[name], self.dtypes[name]) for name in self.inputs}
        caller = torch.cuda.current_stream()
        self.stream.wait_stream(caller)
        if profile != self.profile:  # raises if TensorRT refuses; shapes must be set again after it
            self.context.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self.profile = profile
        for name, tensor in tensors.items():
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise UserError(f"{self.path.name}: {name} of shape {tuple(tensor.shape)} is outside "
                                f"optimisation profile {profile} of the engine")
            self._bind(name, tensor)
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if min(shape, default=0) < 0:
                raise UserError(f"{self.path.name}: the shape of {name} is not known from the inputs ({shape})")
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=tensors[self.inputs[0]].device)
            self._bind(name, outputs[name])
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT could not enqueue {self.path.name} (execute_async_v3 returned False)")
        caller.wait_stream(self.stream)
        return outputs

    def _bind(self, name: str, tensor) -> None:
        if not self.context.set_tensor_address(name, tensor.data_ptr()):
            raise RuntimeError(f"TensorRT refused the address of {name} in {self.path.name}")

    def close(self) -> None:
        """Release the context, then the engine (TensorRT: contexts before their engine)."""
        self.context = None
        self.engine = None


def load_engines(load, roles) -> dict:
    """{role: load(role)} in order; if one fails, those already loaded are closed before the error
    goes on, so no context of a half-opened runner stays alive on the GPU."""
    engines = {}
    try:
        for role in roles:
            engines[role] = load(role)
    except BaseException:
        for engine in reversed(list(engines.values())):
            engine.close()
        raise
    return engines


class TrtModel:
    """The surface TorchRunner uses of a model (encode, decode, cfg, dtype, to, eval) over the
    encoder and decoder engines."""

    def __init__(self, export_dir: Path, manifest: dict, entry: dict):
        import torch

        from ..model import ImageState

        trt = import_tensorrt()
        self.state_type = ImageState
        self.cfg = manifest_config(manifest)
        self.limits = (entry["max_clicks"], entry["max_prompts"])
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = load_engines(lambda role: TrtEngine(trt, self.runtime, export_dir / ENGINE_FILES[role]),
                                    ENGINE_FILES)
        self.dtype = self.engines["decoder"].dtypes["image_embed"]  # the state's dtype (depth stays float32)
        self.device = torch.device("cuda")
        self.cat = torch.cat

    def encode(self, image):
        out = self.engines["encoder"].run({"image": image.float()})
        return self.state_type(*(out[name] for name in self.state_type._fields))

    def decode(self, state, point_coords, point_labels, prev_mask):
        decoder, feed = self.engines["decoder"], state._asdict()

        def one_call(coords, labels, prev, profile):
            clicks = {"point_coords": coords, "point_labels": labels, "prev_mask": prev}
            return decoder.run({**feed, **clicks}, profile)["mask_logits"]

        return split_decode(one_call, point_coords, point_labels, prev_mask, *self.limits, concat=self.cat)

    def to(self, device) -> "TrtModel":
        if str(device) not in ("cuda", "cuda:0"):
            raise UserError(f"TensorRT engines run on the GPU they were built for (cuda), not {device}")
        return self

    def eval(self) -> "TrtModel":
        return self

    def close(self) -> None:
        for engine in reversed(list(self.engines.values())):
            engine.close()
        self.engines = {}


class TrtRunner(TorchRunner):
    """TorchRunner over the engines: the device-resident click loop, one context per engine (not
    shared across threads). CUDA graphs off: TensorRT binds tensor addresses per call, which a
    captured graph would freeze."""

    name = "trt"

    def __init__(self, export_dir: str | Path):
        import_tensorrt()
        require_cuda()
        export_dir = Path(export_dir)
        manifest = read_manifest(export_dir)
        self.engine_info = e = check_engines(manifest, runtime_info(), export_dir)
        super().__init__(TrtModel(export_dir, manifest, e), "cuda", cuda_graphs=False,
                         notes=[f"engines: {e['precision']} TensorRT {e['tensorrt']} on {e['gpu']}"])

    def close(self) -> None:
        self.model.close()


def open_runner(spec) -> TrtRunner:
    """The engines hold one precision (one per build) and run on the GPU: anything else asked for
    is refused, never run as what the engines are."""
    if spec.device not in (None, "cuda", "cuda:0"):
        raise UserError(f"TensorRT engines run on the CUDA GPU they were built for, not on {spec.device!r}")
    engines = read_manifest(spec.export_dir).get("engines") or {}
    if engines.get("precision", spec.precision) != spec.precision:
        raise UserError(f"the engines in {spec.export_dir} are {engines['precision']}: ask for --precision "
                        f"{engines['precision']}, or run ois-deploy build {spec.export_dir} --precision {spec.precision}")
    return TrtRunner(spec.export_dir)
