"""Graph lint: the checks that keep exported graphs buildable by TensorRT and true to contract.

- onnx.checker full check;
- ops outside TensorRT's ONNX parser, and the forbidden patterns of docs/design.md §3 (OneHot,
  NonZero, Loop, If, Scan; shape tensors computed from input values; -inf/NaN constants);
- the FP32 islands of an fp16 graph (docs/design.md §4): LayerNormalization and Softmax read
  float32, the attention logits before a Softmax are not float16 values cast up, and a fused
  Attention node reads float32 Q and K (its logits are computed in their dtype);
- input/output names, dtypes and dynamic axes as the contract declares.
Each problem names the node (or tensor) it is about.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError, first_line
from ..contract import (
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    graph_file,
    metadata_problems,
    read_manifest,
    state_shapes,
)
from ..presets import OISConfig
from ..provenance import sha256_file

# ONNX ops TensorRT 10's parser imports that these graphs may use.
TENSORRT_OPS = frozenset(
    """Abs Add And ArgMax ArgMin AveragePool BatchNormalization Cast Ceil Clip Concat Constant
    ConstantOfShape Conv ConvTranspose Cos CumSum DepthToSpace Div Einsum Equal Erf Exp Expand
    Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalMaxPool Greater
    GreaterOrEqual GroupNormalization Identity InstanceNormalization LayerNormalization LeakyRelu
    Less LessOrEqual Log MatMul Max MaxPool Mean Min Mul Neg Not Or Pad Pow PRelu Range Reciprocal
    ReduceL2 ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum Relu Reshape Resize Round Shape
    Sigmoid Sign Sin Size Slice Softmax Softplus Split Sqrt Squeeze Sub Sum Tanh Tile Transpose
    Unsqueeze Where Xor""".split()
)
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})  # int8 graphs (TensorRT imports them as Q/DQ layers)
FORBIDDEN_OPS = frozenset({"OneHot", "NonZero", "Loop", "If", "Scan", "Unique", "Compress"})
FUSED_ATTENTION_OP = "Attention"  # opset 23, emitted by --attention fused
# Inputs that TensorRT treats as shape tensors: they must not depend on input *values*.
SHAPE_INPUTS = {
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "ConstantOfShape": (0,),
    "Range": (0, 1, 2),
    "Slice": (1, 2, 3, 4),
    "Pad": (1,),
    "Resize": (2, 3),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "TopK": (1,),
    "ReduceMax": (1,),
    "ReduceMin": (1,),
    "ReduceSum": (1,),
    "ReduceMean": (1,),
}
SHAPE_SOURCES = frozenset({"Shape", "Size"})  # produce shape information, not value information
FLOAT16 = 10
FLOAT = 1
# What lies between the attention logits' MatMul and the Softmax: scaling and the additive bias.
LOGIT_ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Div", "Neg"})


@dataclass
class LintReport:
    graph: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _value_dependent(graph) -> set[str]:
    """Tensors whose values depend on graph input values (Shape/Size cut the dependency)."""
    dependent = {i.name for i in graph.input}
    for node in graph.node:  # exported graphs are topologically sorted (the checker enforces it)
        if node.op_type in SHAPE_SOURCES:
            continue
        if any(name in dependent for name in node.input if name):
            dependent.update(o for o in node.output if o)
    return dependent


def _nonfinite_constants(model) -> list[str]:
    from onnx import numpy_helper

    bad = []
    for init in model.graph.initializer:
        if init.data_type in (1, 10, 11, 16):  # float, float16, double, bfloat16
            values = numpy_helper.to_array(init)
            if values.size and not np.isfinite(values.astype(np.float32)).all():
                bad.append(f"initializer {init.name} holds inf or NaN")
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name in ("value", "value_float", "value_floats"):
                    arr = numpy_helper.to_array(attr.t) if attr.name == "value" else np.array(attr.f or attr.floats)
                    if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr.astype(np.float32)).all():
                        bad.append(f"node {node.name} ({node.op_type}) holds inf or NaN")
    return bad


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def expected_io(role: str, manifest: dict, precision: str) -> dict[str, tuple[list, int | None]]:
    """name -> (dims, elem type or None for 'any') of the graph contract (docs/design.md §3)."""
    cfg = OISConfig.from_dict(manifest["config"])
    s, mask = cfg.input_size, cfg.mask_size
    body = FLOAT16 if precision == "fp16" else 1
    state = {k: (list(shape[1:]), 1 if k == "depth" else body) for k, shape in state_shapes(cfg).items()}
    if role == "encoder":
        io = {"image": (["B", 3, s, s], 1)}
        io.update({k: (["B", *d], t) for k, (d, t) in state.items()})
        return io
    io = {k: ([1, *d], t) for k, (d, t) in state.items()}
    io.update(
        {
            "point_coords": (["P", "N", 2], 1),
            "point_labels": (["P", "N"], None),
            "prev_mask": (["P", 1, s, s], 1),
            "mask_logits": (["P", 1, mask, mask], 1),
        }
    )
    return io


def lint_graph(path: Path, role: str, precision: str, manifest: dict) -> LintReport:
    import onnx

    report = LintReport(path.name)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        report.problems.append(f"onnx.checker: {first_line(e)}")
        return report
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=False)
    graph = model.graph
    # The manifest's record of this file and the graph's own metadata must agree with the folder.
    recorded = manifest["graphs"].get(path.name, {}).get("sha256")
    if recorded != sha256_file(path):
        report.problems.append(f"sha256 differs from manifest.json ({'not listed' if recorded is None else 'edited or swapped'})")
    report.problems += metadata_problems(path, {p.key: p.value for p in model.metadata_props}, manifest, role, precision)

    names_in = ENCODER_INPUTS if role == "encoder" else DECODER_INPUTS
    names_out = ENCODER_OUTPUTS if role == "encoder" else DECODER_OUTPUTS
    if [i.name for i in graph.input] != list(names_in) or [o.name for o in graph.output] != list(names_out):
        report.problems.append(
            f"graph I/O {[i.name for i in graph.input]} -> {[o.name for o in graph.output]} differs from the contract"
        )
    for vi in list(graph.input) + list(graph.output):
        want = expected_io(role, manifest, precision).get(vi.name)
        if want is None:
            continue
        dims, elem = want
        if _dims(vi) != dims:
            report.problems.append(f"tensor {vi.name}: dims {_dims(vi)}, contract says {dims}")
        if elem is not None and vi.type.tensor_type.elem_type != elem:
            report.problems.append(f"tensor {vi.name}: elem type {vi.type.tensor_type.elem_type}, contract says {elem}")

    report.problems += node_problems(model, precision, fused=manifest.get("attention") == "fused")
    if manifest.get("attention") == "fused":
        report.notes.append("uses the ONNX Attention op (opset 23): needs a TensorRT parser that imports it")
    return report


def node_problems(model, precision: str, fused: bool = False) -> list[str]:
    """Op support, forbidden patterns, value-dependent shapes, fp16 islands, non-finite constants.
    `model` must have gone through shape inference (dtypes of intermediate tensors)."""
    graph = model.graph
    problems = []
    dependent = _value_dependent(graph)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(graph.value_info) + list(graph.input) + list(graph.output)}
    producer = {out: n for n in graph.node for out in n.output}
    for node in graph.node:
        where = f"node {node.name or '?'} ({node.op_type})"
        if node.op_type in FORBIDDEN_OPS:
            problems.append(f"{where}: forbidden op (data-dependent shape or control flow)")
        elif node.op_type == FUSED_ATTENTION_OP and fused:
            pass
        elif node.op_type in QDQ_OPS and precision == "int8":
            pass
        elif node.op_type not in TENSORRT_OPS or node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: op not in TensorRT's ONNX parser support")
        for index in SHAPE_INPUTS.get(node.op_type, ()):
            if index < len(node.input) and node.input[index] in dependent:
                problems.append(f"{where}: shape input {node.input[index]!r} is computed from input values")
        if precision == "fp16":
            problems += [f"{where}: {problem}" for problem in _island_problems(node, producer, types)]
    return problems + _nonfinite_constants(model)


def _dtype_name(elem_type) -> str:
    return {FLOAT: "float32", FLOAT16: "float16"}.get(elem_type, "not float32")


def _island_problems(node, producer: dict, types: dict) -> list[str]:
    """Where an fp16 graph's node leaves its FP32 island (docs/design.md §4)."""
    if node.op_type in ("LayerNormalization", "Softmax") and types.get(node.input[0]) != FLOAT:
        return [f"input is {_dtype_name(types.get(node.input[0]))}; it must stay in an FP32 island"]
    if node.op_type == "Softmax":
        return _logits_in_fp16(node.input[0], producer, types)
    if node.op_type == FUSED_ATTENTION_OP:
        low = [f"{role} {node.input[i]!r} is {_dtype_name(types.get(node.input[i]))}" for i, role in enumerate(("Q", "K"))
               if types.get(node.input[i]) != FLOAT]
        return [f"{', '.join(low)}: the attention logits must stay in an FP32 island (float32 Q and K)"] if low else []
    return []


def _logits_in_fp16(logits: str, producer: dict, types: dict) -> list[str]:
    """Walk from a Softmax's input back through the scale and bias arithmetic (producer: the
    node that outputs each tensor): a float16 tensor cast up on the way means the logits (or
    their bias) were computed in float16."""
    problems, todo, seen = [], [logits], set()
    while todo:
        name = todo.pop()
        node = producer.get(name)
        if node is None or name in seen:
            continue
        seen.add(name)
        if node.op_type in LOGIT_ARITHMETIC:
            todo += [i for i in node.input if i]
        elif node.op_type == "Cast" and types.get(node.input[0]) == FLOAT16:
            problems.append(f"logits {logits!r} are float16 {node.input[0]!r} cast up; "
                            "they must be computed in an FP32 island")
    return problems


def lint_export(out_dir: str | Path, precisions: tuple[str, ...] | None = None) -> list[LintReport]:
    """Lint every graph of an export folder (or the given precisions)."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    reports = []
    for precision in precisions or tuple(manifest["precisions"]):
        for role in ("encoder", "decoder"):
            path = out_dir / graph_file(role, precision)
            if not path.is_file():
                raise UserError(f"graph missing: {path}")
            reports.append(lint_graph(path, role, precision, manifest))
    return reports
