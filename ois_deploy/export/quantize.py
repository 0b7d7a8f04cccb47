"""INT8 graphs: ONNX Runtime static quantization (QDQ, per-channel weights) of the FP32 graphs
(docs/design.md §4.1), calibrated on real inputs; and, where nncf is installed, OpenVINO's own
INT8 decoder (NNCF) from the same calibration feeds (docs/design.md §4.3).

Calibration data: the bundled images and generated scenes of a stream of their own (neither the
training stream nor the held-out one). The encoder reads them as images; the decoder reads the
FP32 model's image states of those images with the click sequences of the evaluation's simulated
user (evaluate.clicker) on the scenes' objects, each click decoded from the previous mask the FP32
model fed back, as in the interactive protocol. Random clicks on the bundled images (which have no
ground truth) complete the set.

What stays FP32 is a set of named node groups (`fp32_groups`), found from the graph's topology;
the default set (`KEEP_FP32`) was chosen by measurement (docs/design.md §4.1,
benchmarks/int8_ablation.py).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from ..contract import graph_file
from ..errors import UserError
from ..runtime.base import Runner

CALIBRATION_STREAM = 3  # make_scene seeds [3, i]: training uses stream 1, held-out scenes 2
CALIBRATION_SCENES = 8
CLICKS_PER_OBJECT = 3  # 6 measured no better with the FP32 groups below (int8_ablation.py)
# MinMax: on the decoder as good as Percentile and better than Entropy (docs/design.md §4.1); the
# histogram calibrators (those two) also hold whole tensors, too many for a 1024 px encoder.
CALIBRATION = {"encoder": "MinMax", "decoder": "MinMax"}
ASSETS = Path(__file__).resolve().parents[1] / "assets"
# Quantized: the ops that carry the arithmetic. Element-wise ops stay FP32 between them (measured:
# quantizing them too cost accuracy and, on a CPU, time in extra Quantize/Dequantize pairs).
OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")
GROUPS = ("attention", "prompt_encoder", "token_convs", "fusion_out_convs", "mask_grid_convs", "layernorm",
          "order_maps", "logits_conv", "depth_head")
KEEP_FP32 = GROUPS
# What NNCF would also quantize and §4.1's recipe keeps in float: element-wise arithmetic,
# resizes, normalisation and pooling (OpenVINO op types); NNCF then quantizes OP_TYPES' kin only.
OPENVINO_FLOAT_TYPES = ("Add", "Multiply", "Subtract", "Divide", "Interpolate", "MVN", "AvgPool", "MaxPool",
                        "ReduceMean", "Concat")
IMAGE_FEATURES = ("image", "image_embed", "pyramid_l1", "pyramid_l2", "pyramid_l3")


# -- which nodes belong to which group --------------------------------------------------------
def _producers(graph) -> dict[str, object]:
    return {out: node for node in graph.node for out in node.output}


def _ancestors(graph, tensors, stop=frozenset()) -> set[str]:
    """Names of the nodes that the tensors depend on (stopping at nodes named in stop)."""
    producers, seen, todo = _producers(graph), set(), list(tensors)
    while todo:
        node = producers.get(todo.pop())
        if node is None or node.name in seen or node.name in stop:
            continue
        seen.add(node.name)
        todo.extend(node.input)
    return seen


def _descendants(graph, tensors) -> set[str]:
    live, seen = set(tensors), set()
    for node in graph.node:  # topologically sorted
        if any(i in live for i in node.input):
            seen.add(node.name)
            live.update(node.output)
    return seen


def _last_of(graph, op_type: str, output: str) -> set[str]:
    """The op_type node nearest to a graph output (walking back through its first inputs)."""
    producers, tensor = _producers(graph), output
    while tensor in producers:
        node = producers[tensor]
        if node.op_type == op_type:
            return {node.name}
        tensor = node.input[0]
    return set()


def fp32_groups(model) -> dict[str, list[str]]:
    """Group name -> node names, by topology (exported node names carry no module paths).

    attention: Softmax, the activation-by-activation MatMuls (Q.K^T, A.V), the scaling and
        bias arithmetic between them, and an absorbed cross-attention's per-head projections; prompt_encoder: the Conv and MatMul nodes that see clicks
        and previous mask but no image features (Fourier features of the click coordinates, the
        patch embedding of the click and mask maps: cheap); token_convs: the mask head's Convs
        fed by the decoder's tokens alone, before the encoder's pyramid joins (the token grid and
        its first reassembly: small maps, and the largest int8 error, measured); fusion_out_convs:
        the 1x1 convs of the mask head's fusion blocks once the pyramid has joined (each reads a
        residual sum; cheap, and the largest single error on the trained ois-tiny);
        mask_grid_convs: the other mask-head convs at the mask grid, the finest level (uint8
        there moved logits near 0 and with them the mask boundary, measured); layernorm:
        LayerNormalization; order_maps: the arithmetic
        from the depth input to the attention biases; logits_conv: the Conv nearest to
        mask_logits; depth_head: the Conv nearest to the depth output."""
    graph = model.graph
    constant_shapes = {i.name: list(i.dims) for i in graph.initializer}
    constant_shapes |= {n.output[0]: list(a.t.dims) for n in graph.node if n.op_type == "Constant"
                        for a in n.attribute if a.name == "value"}
    constants = set(constant_shapes) | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    softmax = [n for n in graph.node if n.op_type == "Softmax"]
    act_matmuls = {n.name for n in graph.node if n.op_type == "MatMul" and not any(i in constants for i in n.input)}
    # between Q.K^T and Softmax: scale and bias adds (no further MatMul on the way back)
    scores = set()
    for node in softmax:
        scores |= _ancestors(graph, node.input[:1], stop=act_matmuls) - {node.name}
    compute = {n.name for n in graph.node if n.op_type in OP_TYPES} - act_matmuls
    depth_cone = _descendants(graph, ["depth"]) if any(i.name == "depth" for i in graph.input) else set()
    # absorbed cross-attention (model/attention.py): the projections folded into the click tokens
    # multiply by per-head weights, the only 3-D constants a MatMul reads; they make the logits
    per_head = {n.name for n in graph.node if n.op_type == "MatMul"
                and any(len(shape) == 3 for shape in (constant_shapes.get(i) for i in n.input) if shape is not None)}
    attention = ({n.name for n in softmax} | act_matmuls | per_head
                 | {s for s in scores if s not in compute and s not in depth_cone})
    outputs = {o.name for o in graph.output}
    pyramid_cone = _descendants(graph, [i.name for i in graph.input if i.name.startswith("pyramid_")])
    image_cone = _descendants(graph, [i.name for i in graph.input if i.name in IMAGE_FEATURES])
    logits_conv = _last_of(graph, "Conv", "mask_logits") if "mask_logits" in outputs else set()
    kernels = {i.name: list(i.dims)[2:] for i in graph.initializer}
    head_convs = [n for n in graph.node if n.op_type == "Conv" and n.name in pyramid_cone - logits_conv]
    out_convs = {n.name for n in head_convs if kernels.get(n.input[1]) == [1, 1]}
    groups = {
        "attention": attention,
        "prompt_encoder": compute - image_cone,
        "token_convs": {n.name for n in graph.node if n.op_type in ("Conv", "ConvTranspose") and n.name in image_cone}
        - pyramid_cone,
        "fusion_out_convs": out_convs,
        "mask_grid_convs": _mask_grid_convs(model, head_convs) - out_convs,
        "layernorm": {n.name for n in graph.node if n.op_type == "LayerNormalization"},
        "order_maps": (depth_cone & scores) - compute,
        "logits_conv": logits_conv,
        "depth_head": _last_of(graph, "Conv", "depth") if "depth" in outputs else set(),
    }
    return {k: sorted(v) for k, v in groups.items()}


def _mask_grid_convs(model, convs) -> set[str]:
    """The convs among `convs` whose output has the largest spatial size (shape inference: the
    graphs' spatial sizes are static)."""
    import onnx

    if not convs:
        return set()
    inferred = onnx.shape_inference.infer_shapes(model).graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.value_info}
    sides = {n.name: shapes.get(n.output[0], [0])[-1] for n in convs}
    return {name for name, side in sides.items() if side == max(sides.values())}


# -- calibration data -------------------------------------------------------------------------
def calibration_images(scenes: int = CALIBRATION_SCENES) -> list[tuple[str, np.ndarray, list[np.ndarray]]]:
    """(name, RGB uint8 image, object masks) for the bundled images (no masks) and the scenes."""
    from ..runtime.preprocess import read_image
    from ..train.scenes import make_scene

    items = [(p.name, read_image(p), []) for p in sorted(ASSETS.glob("*.png")) + sorted(ASSETS.glob("*.jpg"))]
    for i in range(scenes):
        scene = make_scene([CALIBRATION_STREAM, i], 360 + 40 * (i % 3), 480 - 40 * (i % 2), 3 + i % 3)
        items.append((f"scene[{CALIBRATION_STREAM},{i}]", scene.image, [m for m in scene.masks if m.mean() >= 0.01]))
    return items


class _Recorder(Runner):
    """A runner over another that keeps the inputs of every encode and decode call as numpy
    feeds. Being a plain Runner, it runs the host click loop: the feeds are what a graph backend
    is given."""

    name = "calibration"

    def __init__(self, inner):
        super().__init__(inner.cfg, "fp32", "cpu")
        self.inner = inner
        self.encoder_feeds, self.decoder_feeds = [], []

    def _encode(self, image):
        self.encoder_feeds.append({"image": image})
        state = self.inner.encode(image)
        return state, self.inner.state_to_numpy(state)

    def _decode(self, state, coords, labels, prev_mask):
        torch_state, arrays = state
        self.decoder_feeds.append({**arrays, "point_coords": coords, "point_labels": labels, "prev_mask": prev_mask})
        return self.inner.decode(torch_state, coords, labels, prev_mask)


def calibration_feeds(model, scenes: int = CALIBRATION_SCENES, clicks: int = CLICKS_PER_OBJECT):
    """(encoder feeds, decoder feeds, description) from the FP32 PyTorch model's sessions."""
    from ..evaluate.clicker import PRED_THRESHOLD, Clicker
    from ..runtime.predictor import Predictor
    from ..runtime.torch_backend import TorchRunner

    recorder = _Recorder(TorchRunner(model))
    predictor = Predictor(recorder)
    rng = np.random.default_rng(0)
    names = []
    for name, image, masks in calibration_images(scenes):
        names.append(name)
        predictor.set_image(image)
        if not masks:  # no ground truth: a positive click, then random ones
            h, w = image.shape[:2]
            for k in range(clicks):
                predictor.click(float(rng.integers(w)), float(rng.integers(h)), k == 0 or bool(rng.random() < 0.6))
        for mask in masks:
            predictor.reset()
            clicker, pred = Clicker(mask), np.zeros(mask.shape, bool)
            for _ in range(clicks):
                click = clicker.next_click(pred)
                pred = predictor.click(click.x, click.y, click.positive, threshold=PRED_THRESHOLD).mask
    # Same shapes in every decoder feed (clicks padded with label -1, as the model pads): the
    # histogram calibrators of ONNX Runtime need them.
    n = model.cfg.decoder.max_clicks
    for feed in recorder.decoder_feeds:
        k = feed["point_labels"].shape[1]
        feed["point_coords"] = np.concatenate([feed["point_coords"], np.zeros((1, n - k, 2), np.float32)], axis=1)
        feed["point_labels"] = np.concatenate([feed["point_labels"], np.full((1, n - k), -1, np.int32)], axis=1)
    description = {
        "images": names,
        "scenes": f"ois_deploy.train.scenes.make_scene([{CALIBRATION_STREAM}, i]) for i < {scenes}",
        "decoder_clicks": f"evaluation clicker, {clicks} clicks per object (random clicks on the bundled images)",
        "encoder_samples": len(recorder.encoder_feeds),
        "decoder_samples": len(recorder.decoder_feeds),
        "decoder_clicks_padded_to": n,
        "method": dict(CALIBRATION),
    }
    return recorder.encoder_feeds, recorder.decoder_feeds, description


class _Reader:
    """ONNX Runtime's CalibrationDataReader over a list of feeds, read one feed per collection
    (set_range): the histogram calibrators keep every intermediate tensor of what they are given
    at once, over 20 GB for a 1024 px encoder and a handful of images."""

    def __init__(self, feeds: list[dict]):
        from onnxruntime.quantization import CalibrationDataReader

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.items = iter(feeds)

            def __len__(self):
                return len(feeds)

            def set_range(self, start_index: int, end_index: int):
                self.items = iter(feeds[start_index:end_index])

            def get_next(self):
                return next(self.items, None)

        self.reader = Reader()


# The calibrator's graph reduces each calibrated tensor to its min and max, but ONNX Runtime runs
# those reductions late, so every tensor stays alive to the end of the run: with a 1024 px ViT's
# attention maps that is over 20 GB (measured). The activation-by-activation MatMuls kept FP32 are
# renamed to the same product as an Einsum while calibrating, so their tensors are not calibrated
# (they are never quantized), and renamed back after.
_PRODUCT = "...ij,...jk->...ik"


def _hide_from_calibration(model, names: set[str]) -> None:
    import onnx

    for node in model.graph.node:
        if node.name in names and node.op_type == "MatMul":
            node.op_type = "Einsum"
            node.attribute.append(onnx.helper.make_attribute("equation", _PRODUCT))


def _restore_matmuls(model, names: set[str]) -> None:
    for node in model.graph.node:
        if node.name in names and node.op_type == "Einsum":
            node.op_type = "MatMul"
            del node.attribute[:]


def quantize_graph(src: Path, dst: Path, feeds: list[dict], keep_fp32=KEEP_FP32, op_types=OP_TYPES,
                   method: str = "MinMax") -> list[str]:
    """Quantize one FP32 graph into dst; returns the names of the nodes kept in FP32."""
    import onnx

    from ..runtime.ort_backend import import_ort

    import_ort()  # onnxruntime.quantization ships with onnxruntime: a one-line error without it
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    unknown = set(keep_fp32) - set(GROUPS)
    if unknown:
        raise UserError(f"unknown FP32 node group(s) {sorted(unknown)}: choose from {', '.join(GROUPS)}")
    model = onnx.load(str(src))
    groups = fp32_groups(model)
    excluded = sorted({name for g in keep_fp32 for name in groups[g]})
    quiet = logging.getLogger()  # the quantizer warns through the root logger about every LayerNorm weight
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
            out = Path(tmp) / dst.name
            weights, kept = {i.name for i in model.graph.initializer}, set(excluded)
            hidden = {n.name for n in model.graph.node  # kept-FP32 products of two activations
                      if n.op_type == "MatMul" and n.name in kept and not weights & set(n.input)}
            _hide_from_calibration(model, hidden)
            quantize_static(
                model, str(out), _Reader(feeds).reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,  # U8S8: the x86 kernels' format
                weight_type=QuantType.QInt8,
                op_types_to_quantize=list(op_types) if op_types else None,
                nodes_to_exclude=excluded,
                calibrate_method=CalibrationMethod[method],
                extra_options={"CalibStridedMinMax": 1},  # one feed per collection (any calibrator)
            )
            quantized = onnx.load(str(out))
            _restore_matmuls(quantized, hidden)
            for prop in quantized.metadata_props:  # the FP32 graph's facts, as an int8 graph
                if prop.key == "ois.precision":
                    prop.value = "int8"
            onnx.save_model(quantized, str(out))
            os.replace(out, dst)
    finally:
        quiet.setLevel(level)
    return excluded


def quantize_openvino_decoder(out_dir: Path, feeds: list[dict], keep_fp32=KEEP_FP32) -> dict | None:
    """OpenVINO's INT8 decoder: NNCF post-training quantization of decoder.onnx on the same
    calibration feeds, the same node groups left in float as the QDQ graph (NNCF's ignored scope;
    OpenVINO keeps the ONNX node names), contract.OPENVINO_INT8_DECODER. Returns its manifest
    record, or None where nncf or openvino is not installed. On ois-tiny, verify's decoder mask
    IoU is 0.9785 against FP32, just under the int8 gate (0.98), and on the CPU measured it ran
    slower than bf16: hence opt-in (OpenVinoRunner int8_decoder, docs/design.md §4.3)."""
    try:
        import nncf
        import openvino as ov
    except ImportError:
        return None
    from ..contract import OPENVINO_INT8_DECODER
    from ..provenance import sha256_file

    import onnx

    nncf.set_log_level(logging.ERROR)
    source = out_dir / graph_file("decoder", "fp32")
    groups = fp32_groups(onnx.load(str(source), load_external_data=False))
    # OpenVINO names an ONNX Conv's convolution "<node>/WithoutBiases" (its bias is an Add after it)
    kept = sorted({f"{name}{suffix}" for g in keep_fp32 for name in groups[g] for suffix in ("", "/WithoutBiases")})
    model = ov.Core().read_model(str(source))
    # MIXED: symmetric weights, asymmetric activations; TRANSFORMER: NNCF's rules for attention
    # blocks (which MatMuls and Softmax inputs it leaves in float).
    quantized = nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds), preset=nncf.QuantizationPreset.MIXED,
                              model_type=nncf.ModelType.TRANSFORMER,
                              ignored_scope=nncf.IgnoredScope(names=kept, types=list(OPENVINO_FLOAT_TYPES), validate=False))
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:  # both files or neither
        ov.save_model(quantized, str(Path(tmp) / OPENVINO_INT8_DECODER[0]), compress_to_fp16=False)
        for name in OPENVINO_INT8_DECODER:
            os.replace(Path(tmp) / name, out_dir / name)
    return {
        "format": "OpenVINO IR, NNCF post-training quantization (preset mixed, model type transformer)",
        "nncf": nncf.__version__,
        "openvino": ov.__version__,
        "calibration_samples": len(feeds),
        "fp32_groups": list(keep_fp32),
        "files": {name: sha256_file(out_dir / name) for name in OPENVINO_INT8_DECODER},
    }


def quantize_export(model, out_dir: Path, graphs: dict, progress=None, scenes: int = CALIBRATION_SCENES,
                    keep_fp32=KEEP_FP32) -> dict:
    """encoder.int8.onnx and decoder.int8.onnx from the FP32 graphs in out_dir, added to the
    manifest's `graphs`. Returns the manifest's "int8" record: calibration data, kept nodes."""
    from ..provenance import sha256_file

    step = progress or (lambda text: None)
    for role in ("encoder", "decoder"):
        if not (out_dir / graph_file(role, "fp32")).is_file():
            raise UserError("int8 graphs are made from the fp32 ones: export fp32 too (--precision fp32,int8)")
    step("int8: calibration sessions")
    encoder_feeds, decoder_feeds, description = calibration_feeds(model, scenes)
    excluded = {}
    for role, feeds in (("encoder", encoder_feeds), ("decoder", decoder_feeds)):
        step(f"quantize {graph_file(role, 'int8')}")
        name = graph_file(role, "int8")
        excluded[role] = quantize_graph(out_dir / graph_file(role, "fp32"), out_dir / name, feeds, keep_fp32,
                                        method=CALIBRATION[role])
        graphs[name] = {"role": role, "precision": "int8", "sha256": sha256_file(out_dir / name)}
    record = {
        "format": "QDQ, per-channel int8 weights, uint8 activations (onnxruntime.quantization.quantize_static)",
        "op_types": list(OP_TYPES),
        "fp32_groups": list(keep_fp32),
        "excluded_nodes": excluded,
        "calibration": description,
    }
    step("int8: OpenVINO decoder (NNCF)")
    openvino = quantize_openvino_decoder(out_dir, decoder_feeds, keep_fp32)
    if openvino is not None:
        record["openvino"] = openvino
    return record
