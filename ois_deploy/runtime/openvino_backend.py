"""OpenVINO backend (openvino): the export's ONNX graphs, read as they are, on the CPU.

Precisions: fp32 (INFERENCE_PRECISION_HINT f32 forced), bf16 (the fp32 graphs with a bf16
inference-precision hint: OpenVINO keeps its own FP32 islands, e.g. softmax and normalisation;
refused on CPUs without AVX512-BF16 or AMX-BF16), int8 (the export's QDQ graphs, with an f32 hint
so that the node groups the export kept in FP32 stay FP32).

Compiled models are cached in DIR/openvino-cache/<key>/, one folder per graph hash, OpenVINO
version, precision and compile settings, so that a changed graph is never served from a stale
blob whatever key OpenVINO itself computes.

Thread safety: a compiled model may be shared by threads, an InferRequest may not. Each call
takes an idle request from a pool (creating one when all are busy) and returns it afterwards,
so a runner can be shared across threads, and with streams > 1 those calls run in parallel.
"""

from __future__ import annotations

import hashlib
import json
import queue
from pathlib import Path

import numpy as np

from ..contract import DECODER_OUTPUTS, ENCODER_OUTPUTS, check_graph, graph_file, manifest_config, read_manifest, weights_notes
from ..errors import UserError, first_line
from ..provenance import cpu_flags
from .base import Runner

CACHE_DIR = "openvino-cache"
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # either runs OpenVINO's BF16 kernels
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")  # the int8 dot-product units
HINTS = ("LATENCY", "THROUGHPUT")


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
    """One compiled model per graph on OpenVINO's CPU plugin, with a pool of infer requests."""

    name = "openvino"

    def __init__(self, export_dir: str | Path, precision: str = "fp32", threads: int = 0, streams: int = 0,
                 hint: str = "LATENCY", cache: bool = True):
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
        config = compile_settings(precision, threads, streams, hint)
        core = ov.Core()
        self.compiled, self._idle = {}, {}
        self.cache_dirs: dict[str, Path] = {}
        for role in ("encoder", "decoder"):
            path = self.export_dir / graph_file(role, graphs)
            check_graph(path, self.manifest)  # the graph is the one the manifest recorded (hash)
            settings = dict(config)
            if cache:
                folder = cache_folder(self.export_dir, self.manifest["graphs"][path.name]["sha256"], ov.__version__,
                                      {k: str(v) for k, v in config.items()})
                folder.mkdir(parents=True, exist_ok=True)
                self.cache_dirs[role] = folder
                settings["CACHE_DIR"] = str(folder)
            try:
                model = core.read_model(str(path))
                if role == "decoder":
                    tile_state_inputs(model, ops)
                self.compiled[role] = core.compile_model(model, "CPU", settings)
            except Exception as e:
                raise UserError(f"cannot load {path} in OpenVINO: {first_line(e)}") from None
            self._idle[role] = queue.SimpleQueue()
        self.loaded_from_cache = {role: bool(c.get_property("LOADED_FROM_CACHE")) for role, c in self.compiled.items()}
        # what OpenVINO actually chose, for bench records and reports
        decoder = self.compiled["decoder"]
        self.runtime_info = {
            "execution_precision": decoder.get_property("INFERENCE_PRECISION_HINT").to_string(),
            "num_streams": int(decoder.get_property("NUM_STREAMS")),
            "threads": int(decoder.get_property("INFERENCE_NUM_THREADS")),
            "performance_hint": str(decoder.get_property("PERFORMANCE_HINT")),
            **isa_info(core),
            "openvino": ov.__version__,
        }
        self.providers = [f"OpenVINO CPU ({self.runtime_info['execution_precision']})"]

    def close(self) -> None:
        self.compiled, self._idle = {}, {}

    def _infer(self, role: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]) -> list[np.ndarray]:
        idle = self._idle[role]
        try:
            request = idle.get_nowait()
        except queue.Empty:
            request = self.compiled[role].create_infer_request()
        try:
            result = request.infer(inputs)
            return [np.array(result[name], np.float32) for name in outputs]  # copies: the request is reused
        finally:
            idle.put(request)

    def _encode(self, image: np.ndarray):
        arrays = self._infer("encoder", {"image": np.ascontiguousarray(image, np.float32)}, ENCODER_OUTPUTS)
        return dict(zip(ENCODER_OUTPUTS, arrays))

    def _decode(self, state, coords: np.ndarray, labels: np.ndarray, prev_mask: np.ndarray) -> np.ndarray:
        clicks = {
            "point_coords": np.ascontiguousarray(coords, np.float32),
            "point_labels": np.ascontiguousarray(labels, np.int32),
            "prev_mask": np.ascontiguousarray(prev_mask, np.float32),
        }
        return self._infer("decoder", {**state, **clicks}, DECODER_OUTPUTS)[0]


def open_runner(spec) -> OpenVinoRunner:
    if spec.device not in (None, "cpu"):
        raise UserError(f"the openvino backend runs on the CPU; device {spec.device!r} is not supported")
    return OpenVinoRunner(spec.export_dir, spec.precision, threads=spec.threads, streams=spec.streams)
