"""OpenVINO backend (openvino): the export's ONNX graphs, read as they are, on the CPU.

Precisions: fp32 (INFERENCE_PRECISION_HINT f32 forced), bf16 (the fp32 graphs with a bf16
inference-precision hint: OpenVINO keeps its own FP32 islands, e.g. softmax and normalisation;
refused on CPUs without AVX512-BF16 or AMX-BF16), int8 (the QDQ graphs, or with
int8_decoder="nncf" the decoder NNCF quantized for OpenVINO: task parity on ois-tiny, its mask
IoU just under verify's int8 gate, slower than bf16 on the CPUs measured (docs/design.md §4.3);
an f32 hint, so that what the quantizers left in float stays FP32).

Compiled models are cached in DIR/openvino-cache/<key>/, one folder per graph hash, OpenVINO
version, precision and compile settings, so that a changed graph is never served from a stale
blob whatever key OpenVINO itself computes.

Image state in the plugin's own form (docs/design.md §4.2): the encoder's outputs leave it in
NHWC, and in BF16 at bf16, as ov.Tensors that the decoder reads as they are. The plugin's
convolutions work in NHWC; fed the contract's NCHW float32, the decoder re-laid and re-cast every
state input again on every click (Reorder nodes in the profile). Both graphs get the conversion
at their boundary (PrePostProcessor), so the encoder converts once per image and the ONNX files
are untouched. The decoder is compiled twice: for one prompt set (a click; the state needs no
broadcast) and, on first use, for P prompt sets (SAT; see tile_state_inputs).

Thread safety: a compiled model may be shared by threads, an InferRequest may not. Each call
takes an idle request from a pool (creating one when all are busy) and returns it afterwards,
so a runner can be shared across threads, and with streams > 1 those calls run in parallel.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from pathlib import Path

import numpy as np

from ..contract import (
    CLICK_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_OUTPUTS,
    OPENVINO_INT8_DECODER,
    check_graph,
    graph_file,
    manifest_config,
    read_manifest,
    weights_notes,
)
from ..errors import UserError, first_line
from ..provenance import cpu_flags, sha256_file
from .base import Runner
from .profiling import NodeTime, summarise
from .registry import INT8_DECODERS

CACHE_DIR = "openvino-cache"
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # either runs OpenVINO's BF16 kernels
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")  # the int8 dot-product units
HINTS = ("LATENCY", "THROUGHPUT")
STATE_LAYOUT = "NHWC"  # the plugin's convolution layout; the contract's state maps are NCHW
# compiled models of a runner: the encoder, the decoder for one prompt set (a click), for P (SAT)
VARIANTS = ("encoder", "decoder", "prompts")


def import_openvino():
    try:
        import openvino
    except ImportError:
        raise UserError("openvino is not installed: pip install 'ois-deploy[openvino]'") from None
    return openvino


def missing_units(precision: str) -> str | None:
    """None where this CPU has the units a precision is for, else a line naming the missing flags."""
    wanted = {"bf16": BF16_FLAGS, "int8": INT8_FLAGS}.get(precision)
    if wanted is None or any(cpu_flags().get(f) for f in wanted):
        return None
    return f"{precision} needs a CPU with {' or '.join(wanted)}; this CPU has none of them"


def graph_precision(precision: str) -> str:
    """Which exported graphs a precision runs: bf16 is a runtime setting on the fp32 graphs."""
    return "fp32" if precision == "bf16" else precision


def cache_folder(export_dir: Path, graph_sha256: str, version: str, config: dict) -> Path:
    key = json.dumps({"graph": graph_sha256, "openvino": version, **config}, sort_keys=True)
    return export_dir / CACHE_DIR / hashlib.sha256(key.encode()).hexdigest()[:16]


def tile_state_inputs(model, ops) -> int:
    """Make the decoder's broadcast of the image state over prompt sets explicit.

    The decoder adds state inputs of batch 1 (image_embed, pyramid_l*) to tensors of P prompt
    sets. OpenVINO's CPU plugin (2026.4) fuses such an Add into the preceding convolution and
    then fails at P > 1 ("Can not clone with new dims"); a Broadcast in front is optimised away
    again, a Tile to P rows is not. The copy is small beside the decoder's work. Returns how many
    Adds were changed."""
    changed = 0
    for param in model.get_parameters():
        shape = param.get_partial_shape()
        if not (shape.is_static and shape[0].get_length() == 1):
            continue
        for target in list(param.output(0).get_target_inputs()):
            node = target.get_node()
            other = node.input_value(1 - target.get_index()) if node.get_input_size() == 2 else None
            if node.get_type_name() != "Add" or other is None or not other.get_partial_shape()[0].is_dynamic:
                continue
            rows = ops.gather(ops.shape_of(other), ops.constant([0]), ops.constant(0))
            repeats = ops.concat([rows, ops.constant(np.ones(shape.rank.get_length() - 1, np.int64))], 0)
            target.replace_source_output(ops.tile(param.output(0), repeats).output(0))
            changed += 1
    model.validate_nodes_and_infer_types()
    return changed


def native_state(ov, model, role: str, element_type):
    """The image state's form at a graph's boundary: the encoder's outputs, or the decoder's
    inputs, in NHWC and element_type; the plugin compiles the conversion into the graph (once
    per image in the encoder; nothing in the decoder, whose convolutions read NHWC)."""
    from openvino.preprocess import PrePostProcessor

    ppp = PrePostProcessor(model)
    for name in ENCODER_OUTPUTS:
        port = ppp.output(name) if role == "encoder" else ppp.input(name)
        port.tensor().set_element_type(element_type)
        port.tensor().set_layout(ov.Layout(STATE_LAYOUT))
        port.model().set_layout(ov.Layout("NCHW"))
    return ppp.build()


def one_prompt_set(model) -> None:
    """Fix the decoder's prompt-set axis P at 1 (a click): the batch-1 state then needs no
    broadcast, and the plugin fuses its Adds into the convolutions without a copy."""
    shapes = {}
    for param in model.get_parameters():
        name = param.get_friendly_name()
        if name in CLICK_INPUTS:
            shape = param.get_partial_shape()
            shape[0] = 1
            shapes[name] = shape
    model.reshape(shapes)


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even, as the plugin rounds."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def checked_openvino_int8(export_dir: Path, record: dict) -> tuple[Path, str]:
    """(the NNCF decoder's .xml, its hash) after checking both files against the manifest."""
    files = record.get("files", {})
    for name in OPENVINO_INT8_DECODER:
        path = export_dir / name
        if not path.is_file():
            raise UserError(f"{path} missing: the manifest records an OpenVINO INT8 decoder; re-export --precision int8")
        if sha256_file(path) != files.get(name):
            raise UserError(f"{path} does not match its manifest (hash differs): re-export the folder")
    return export_dir / OPENVINO_INT8_DECODER[0], files[OPENVINO_INT8_DECODER[0]]


def isa_info(core) -> dict:
    """What OpenVINO's CPU plugin can use here, and the CPU flags behind it (for bench records)."""
    return {"openvino_capabilities": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
            "cpu_flags": {k: v for k, v in cpu_flags().items() if k != "model"}}


def compile_settings(precision: str, threads: int = 0, streams: int = 0, hint: str = "LATENCY") -> dict:
    """OpenVINO CPU compile settings for a precision (0 threads or streams: the hint's choice)."""
    if hint not in HINTS:
        raise UserError(f"OpenVINO performance hint must be {' or '.join(HINTS)}, not {hint!r}")
    config = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision], "PERFORMANCE_HINT": hint}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if streams:
        config["NUM_STREAMS"] = streams
    return config


class OpenVinoRunner(Runner):
    """Compiled models on OpenVINO's CPU plugin (encoder; decoder for one prompt set; decoder
    for P, compiled on first use), each with a pool of infer requests. The image state is a dict
    of ov.Tensors in the plugin's form (NHWC; BF16 at bf16)."""

    name = "openvino"

    def __init__(self, export_dir: str | Path, precision: str = "fp32", threads: int = 0, streams: int = 0,
                 hint: str = "LATENCY", cache: bool = True, profile: bool = False, int8_decoder: str = "qdq"):
        ov = import_openvino()
        import openvino.opset13 as ops

        if precision not in PRECISION_HINTS:
            raise UserError(f"precision must be one of {', '.join(PRECISION_HINTS)} for openvino, not {precision!r}")
        if precision == "bf16" and (missing := missing_units("bf16")):
            raise UserError(missing)
        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(self.export_dir)
        graphs = graph_precision(precision)
        if graphs not in self.manifest["precisions"]:
            raise UserError(f"{export_dir} has no {graphs} graphs (it has {', '.join(self.manifest['precisions'])})"
                            + (": ois-deploy export --precision fp32,int8" if precision == "int8" else ""))
        super().__init__(manifest_config(self.manifest), precision, "cpu", weights_notes(self.manifest))
        self._ov, self._ops, self._core, self._cache = ov, ops, ov.Core(), cache
        self.config = compile_settings(precision, threads, streams, hint)
        if profile:  # the plugin's per-node counters, read by profile_decode
            self.config["PERF_COUNT"] = True
        self.state_type = ov.Type.bf16 if precision == "bf16" else ov.Type.f32
        self.paths = {role: self.export_dir / graph_file(role, graphs) for role in ("encoder", "decoder")}
        for path in self.paths.values():
            check_graph(path, self.manifest)  # the graph is the one the manifest recorded (hash)
        self.hashes = {role: self.manifest["graphs"][path.name]["sha256"] for role, path in self.paths.items()}
        if int8_decoder not in INT8_DECODERS:
            raise UserError(f"int8_decoder must be one of {', '.join(INT8_DECODERS)}, not {int8_decoder!r}")
        if precision == "int8" and int8_decoder == "nncf":  # OpenVINO's own INT8 decoder (NNCF), opt-in
            nncf = self.manifest.get("int8", {}).get("openvino")
            if not nncf:
                raise UserError(f"{export_dir} has no OpenVINO INT8 decoder: re-export --precision int8 with nncf "
                                "installed (pip install 'ois-deploy[openvino]')")
            self.paths["decoder"], self.hashes["decoder"] = checked_openvino_int8(self.export_dir, nncf)
        if precision == "int8" and not missing_units("bf16"):
            self.notes.append("int8 on OpenVINO ran slower than bf16 on the CPUs measured (QDQ and NNCF decoders, "
                              "docs/design.md §4.3): --precision bf16 is the faster choice on this CPU")
        self.compiled, self.cache_dirs = {}, {}
        self._idle = {variant: queue.SimpleQueue() for variant in VARIANTS}
        self._compiling = threading.Lock()
        for variant in ("encoder", "decoder"):
            self.compiled[variant] = self._compile(variant)
        self.loaded_from_cache = {role: bool(c.get_property("LOADED_FROM_CACHE")) for role, c in self.compiled.items()}
        # what OpenVINO actually chose, for bench records and reports
        decoder = self.compiled["decoder"]
        self.runtime_info = {
            "execution_precision": decoder.get_property("INFERENCE_PRECISION_HINT").to_string(),
            "num_streams": int(decoder.get_property("NUM_STREAMS")),
            "threads": int(decoder.get_property("INFERENCE_NUM_THREADS")),
            "performance_hint": str(decoder.get_property("PERFORMANCE_HINT")),
            "state": f"{STATE_LAYOUT} {self.state_type.get_type_name()}",
            "decoder_graph": self.paths["decoder"].name,  # which int8 decoder (QDQ or NNCF) a record timed
            **isa_info(self._core),
            "openvino": ov.__version__,
        }
        self.providers = [f"OpenVINO CPU ({self.runtime_info['execution_precision']})"]

    def _compile(self, variant: str):
        """Compile one of VARIANTS, from the export's graph, in a cache folder of its own."""
        role = "encoder" if variant == "encoder" else "decoder"
        path = self.paths[role]
        settings = dict(self.config)
        if self._cache:
            folder = cache_folder(self.export_dir, self.hashes[role], self._ov.__version__,
                                  {"variant": variant, **{k: str(v) for k, v in self.config.items()}})
            folder.mkdir(parents=True, exist_ok=True)
            self.cache_dirs[variant] = folder
            settings["CACHE_DIR"] = str(folder)
        try:
            model = self._core.read_model(str(path))
            if variant == "decoder":
                one_prompt_set(model)
            elif variant == "prompts":
                tile_state_inputs(model, self._ops)
            return self._core.compile_model(native_state(self._ov, model, role, self.state_type), "CPU", settings)
        except Exception as e:
            raise UserError(f"cannot load {path} in OpenVINO: {first_line(e)}") from None

    def _model(self, variant: str):
        if variant not in self.compiled:
            with self._compiling:
                if variant not in self.compiled:
                    self.compiled[variant] = self._compile(variant)
        return self.compiled[variant]

    def close(self) -> None:
        self.compiled = {}
        self._idle = {variant: queue.SimpleQueue() for variant in VARIANTS}

    def _infer(self, variant: str, inputs: dict, read):
        """read(request) after an inference on an idle request of `variant` (the request is reused:
        read copies what it keeps)."""
        idle = self._idle[variant]
        try:
            request = idle.get_nowait()
        except queue.Empty:
            request = self._model(variant).create_infer_request()
        try:
            request.infer(inputs, share_inputs=True)  # the host arrays are read in place, not copied
            return read(request)
        finally:
            idle.put(request)

    def _copy(self, tensor):
        out = self._ov.Tensor(tensor.element_type, tensor.shape)
        tensor.copy_to(out)
        return out

    def _encode(self, image: np.ndarray):
        return self._infer("encoder", {"image": np.ascontiguousarray(image, np.float32)},
                           lambda request: {name: self._copy(request.get_tensor(name)) for name in ENCODER_OUTPUTS})

    def _click_feed(self, state, coords: np.ndarray, labels: np.ndarray, prev_mask: np.ndarray) -> dict:
        return {
            **state,
            "point_coords": np.ascontiguousarray(coords, np.float32),
            "point_labels": np.ascontiguousarray(labels, np.int32),
            "prev_mask": np.ascontiguousarray(prev_mask, np.float32),
        }

    @staticmethod
    def _decoder_for(coords: np.ndarray) -> str:
        """The compiled decoder for these clicks: one prompt set (a click) or P (SAT)."""
        return "decoder" if len(coords) == 1 else "prompts"

    def _decode(self, state, coords: np.ndarray, labels: np.ndarray, prev_mask: np.ndarray) -> np.ndarray:
        return self._infer(self._decoder_for(coords), self._click_feed(state, coords, labels, prev_mask),
                           lambda request: np.array(request.get_tensor(DECODER_OUTPUTS[0]).data, np.float32))

    def state_to_numpy(self, state) -> dict[str, np.ndarray]:
        """The contract's form: float32 NCHW."""
        out = {}
        for name, tensor in state.items():
            data = tensor.data
            data = from_bf16_bits(data.view(np.uint16)) if tensor.element_type == self._ov.Type.bf16 else data
            out[name] = np.ascontiguousarray(data.transpose(0, 3, 1, 2), np.float32)
        return out

    def state_from_numpy(self, arrays: dict[str, np.ndarray]) -> dict:
        state = {}
        for name, array in arrays.items():
            nhwc = np.ascontiguousarray(np.asarray(array, np.float32).transpose(0, 2, 3, 1))
            if self.state_type == self._ov.Type.bf16:
                tensor = self._ov.Tensor(self.state_type, self._ov.Shape(list(nhwc.shape)))
                tensor.data.view(np.uint16)[...] = to_bf16_bits(nhwc)
            else:
                tensor = self._ov.Tensor(nhwc.copy())
            state[name] = tensor
        return state

    def profile_decode(self, state, coords: np.ndarray, labels: np.ndarray, prev_mask: np.ndarray, calls: int) -> dict:
        """The plugin's per-node counters (PERF_COUNT) over `calls` decoder calls, after one
        warm-up call: what each executed node took, by the plugin's own node types (Reorder
        is a layout or precision conversion)."""
        if not self.config.get("PERF_COUNT"):
            raise UserError("open the openvino runner with profile=True to read its node counters")
        feed = self._click_feed(state, coords, labels, prev_mask)
        request = self._model(self._decoder_for(coords)).create_infer_request()
        request.infer(feed)
        events, walls = [], []
        for _ in range(calls):
            start = time.perf_counter()
            request.infer(feed)
            walls.append((time.perf_counter() - start) * 1000)
            events += [NodeTime(p.node_name, p.node_type, p.exec_type, p.real_time.total_seconds() * 1000)
                       for p in request.profiling_info if p.status == p.Status.EXECUTED]
        return summarise(events, calls, walls, f"OpenVINO {self._ov.__version__} CPU ({self.precision})")


def open_runner(spec) -> OpenVinoRunner:
    if spec.device not in (None, "cpu"):
        raise UserError(f"the openvino backend runs on the CPU; device {spec.device!r} is not supported")
    return OpenVinoRunner(spec.export_dir, spec.precision, threads=spec.threads, streams=spec.streams,
                          profile=spec.profile, int8_decoder=spec.int8_decoder)
