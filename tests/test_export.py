"""CI parity: ois-tiny exported in both precisions, linted, and verified with ONNX Runtime CPU
against PyTorch FP32; broken export folders give clean errors."""

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ois_deploy.errors import UserError
from ois_deploy.export.lint import lint_export, node_problems
from ois_deploy.contract import read_manifest, write_manifest
from ois_deploy.model import get_preset
from ois_deploy.model.weights import load_model
from ois_deploy.provenance import sha256_file
from ois_deploy.verify import TOLERANCES, verify


@pytest.fixture
def export_copy(tiny_export, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_export, dst)
    return dst


@pytest.fixture(scope="module")
def fused_export(tmp_path_factory):
    """ois-tiny's FP16 graphs with `--attention fused` (ONNX Attention, opset 23); about 45 s."""
    from ois_deploy.export.onnx import ExportRequest, export_model
    from ois_deploy.model.weights import weights_provenance

    out = tmp_path_factory.mktemp("fused") / "ois-tiny"
    model, report = load_model("ois-tiny")
    export_model(model, weights_provenance(report), ExportRequest(out, precisions=("fp16",), opset=23, attention="fused"))
    return out


def test_export_writes_graphs_manifest_and_metadata(tiny_export):
    names = {p.name for p in tiny_export.iterdir()}
    assert {"encoder.onnx", "decoder.onnx", "encoder.fp16.onnx", "decoder.fp16.onnx", "manifest.json"} <= names
    manifest = read_manifest(tiny_export)
    assert manifest["preset"] == "ois-tiny" and manifest["input_size"] == get_preset("ois-tiny").input_size and manifest["opset"] == 18
    assert set(manifest["graphs"]) == {"encoder.onnx", "decoder.onnx", "encoder.fp16.onnx", "decoder.fp16.onnx"}
    assert {"torch", "onnx"} <= set(manifest["versions"])
    meta = {p.key: p.value for p in onnx.load(str(tiny_export / "decoder.fp16.onnx")).metadata_props}
    assert meta["ois.preset"] == "ois-tiny" and meta["ois.precision"] == "fp16" and meta["ois.role"] == "decoder"
    assert meta["ois.model_hash"] == manifest["model_hash"] and meta["ois.max_clicks"] == "24"


def test_graph_contracts_and_lint(tiny_export):
    reports = lint_export(tiny_export)
    assert [r.graph for r in reports] == ["encoder.onnx", "decoder.onnx", "encoder.fp16.onnx", "decoder.fp16.onnx"]
    assert all(r.ok for r in reports), [r.problems for r in reports]
    decoder = onnx.load(str(tiny_export / "decoder.onnx"))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in decoder.graph.input}
    cfg = get_preset("ois-tiny")
    assert dims["point_coords"] == ["P", "N", 2] and dims["prev_mask"] == ["P", 1, cfg.input_size, cfg.input_size]
    assert dims["image_embed"] == [1, cfg.decoder.width, cfg.grid, cfg.grid]
    ops = {n.op_type for n in decoder.graph.node}
    assert not ops & {"OneHot", "NonZero", "Loop", "If", "Tile"}
    assert {"MatMul", "Softmax", "LayerNormalization"} <= ops


def test_ort_parity_within_tolerances(tiny_export):
    result = verify(tiny_export)
    assert result["passed"], result["failures"]
    rows = {(r["precision"], r["output"]): r for r in result["results"]}
    assert rows[("fp32", "decoder/mask_logits")]["rel_l2"] < 1e-4
    assert rows[("fp32", "encoder/depth")]["rel_l2"] < 1e-4
    fp16 = rows[("fp16", "session/mask_logits")]
    assert fp16["rel_l2"] < 1e-2 and fp16["nonfinite"] == 0 and fp16["mask_iou_mean"] >= 0.98
    assert all(r["nonfinite"] == 0 for r in result["results"])


def test_verify_fails_above_tolerance(tiny_export):
    result = verify(tiny_export, precisions=("fp16",), tolerances={"fp16": {"rel_l2": 1e-9}})
    assert not result["passed"] and any("rel_l2" in f for f in result["failures"])
    assert TOLERANCES["fp16"]["rel_l2"] == 1e-2  # overrides do not leak into the defaults


def test_ort_predictor_matches_torch(tiny_export, rng):
    from ois_deploy import Predictor

    image = rng.integers(0, 256, (130, 200, 3), dtype=np.uint8)
    torch_p, ort_p = Predictor.open("ois-tiny"), Predictor.open(str(tiny_export), backend="ort", device="cpu")
    for p in (torch_p, ort_p):
        p.set_image(image)
    for x, y, positive in [(100, 60, True), (20, 20, False), (150, 100, True)]:
        a, b = torch_p.click(x, y, positive), ort_p.click(x, y, positive)
        np.testing.assert_allclose(b.logits, a.logits, atol=1e-4)
    ort16 = Predictor.open(str(tiny_export), backend="ort", precision="fp16")
    ort16.set_image(image)
    assert np.isfinite(ort16.click(100, 60).logits).all()


def test_corrupted_graph_is_refused(export_copy):
    path = export_copy / "decoder.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match="does not match its manifest"):
        verify(export_copy)
    manifest = json.loads((export_copy / "manifest.json").read_text())
    manifest["graphs"]["decoder.onnx"]["sha256"] = sha256_file(path)  # even with a matching hash
    (export_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="cannot load"):
        verify(export_copy)


def test_graph_from_another_preset_is_refused(export_copy):
    from ois_deploy.runtime.ort_backend import OrtRunner

    path = export_copy / "encoder.onnx"
    graph = onnx.load(str(path))
    for prop in graph.metadata_props:
        if prop.key == "ois.preset":
            prop.value = "ois-s-1024"
    onnx.save(graph, str(path))
    with pytest.raises(UserError, match="does not match its manifest"):
        OrtRunner(export_copy)
    manifest = json.loads((export_copy / "manifest.json").read_text())
    manifest["graphs"]["encoder.onnx"]["sha256"] = sha256_file(path)
    (export_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="ois.preset='ois-s-1024'.*mixed exports"):
        OrtRunner(export_copy)


def test_missing_files_are_refused(export_copy, tmp_path):
    (export_copy / "decoder.fp16.onnx").unlink()
    with pytest.raises(UserError, match="graph missing"):
        lint_export(export_copy)
    (export_copy / "manifest.json").unlink()
    with pytest.raises(UserError, match="no manifest.json"):
        verify(export_copy)
    with pytest.raises(UserError, match="export folder not found"):
        verify(tmp_path / "nowhere")


def test_reference_with_other_weights_is_refused(export_copy):
    manifest = json.loads((export_copy / "manifest.json").read_text())
    manifest["model_hash"] = "0" * 16
    (export_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="weights differ"):
        verify(export_copy)


def _graph(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_lint_flags_forbidden_and_value_dependent_patterns():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = _graph(
        [
            helper.make_node("NonZero", ["x"], ["nz"], name="find"),
            helper.make_node("Cast", ["x"], ["shape"], to=TensorProto.INT64, name="to_shape"),
            helper.make_node("Reshape", ["x", "shape"], ["r"], name="reshape_by_value"),
            helper.make_node("Shape", ["x"], ["s"], name="shape_of"),
            helper.make_node("Reshape", ["x", "s"], ["r2"], name="reshape_by_shape"),
            helper.make_node("Hardmax", ["r2"], ["y"], name="odd_op"),
        ],
        [x, idx],
        [y],
        [helper.make_tensor("minf", TensorProto.FLOAT, [1], [float("-inf")])],
    )
    problems = node_problems(model, "fp32")
    text = "\n".join(problems)
    assert "find (NonZero): forbidden op" in text
    assert "reshape_by_value (Reshape): shape input 'shape' is computed from input values" in text
    assert "reshape_by_shape" not in text  # shapes of inputs are fine, their values are not
    assert "odd_op (Hardmax): op not in TensorRT" in text
    assert "initializer minf holds inf" in text


def test_lint_flags_fp16_layernorm_and_softmax():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)
    w = helper.make_tensor("w", TensorProto.FLOAT16, [4], np.ones(4, np.float16).tobytes(), raw=True)
    model = _graph(
        [
            helper.make_node("LayerNormalization", ["x", "w"], ["y"], name="ln16"),
            helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT),
            helper.make_node("Softmax", ["x32"], ["z"], name="softmax32"),
        ],
        [x],
        [y, z],
        [w],
    )
    problems = node_problems(model, "fp16")
    assert len(problems) == 2 and "ln16 (LayerNormalization): input is float16" in problems[0]
    assert "softmax32 (Softmax): logits 'x32' are float16 'x' cast up" in problems[1]  # a float32 input is not enough
    assert node_problems(model, "fp32") == []


def test_export_from_a_checkpoint_records_and_checks_its_weights(tmp_path, tiny):
    """verify finds the reference weights through the manifest, and refuses other weights."""
    import torch

    from ois_deploy.export.onnx import ExportRequest, export_model
    from ois_deploy.model.weights import save_checkpoint, weights_provenance

    import copy

    ckpt, other = tmp_path / "trained.safetensors", tmp_path / "other.safetensors"
    trained = copy.deepcopy(tiny)  # the session's model stays as it is
    with torch.no_grad():
        trained.decoder.order_sigma.add_(0.5)
        save_checkpoint(trained, ckpt)
        trained.decoder.neck.bias.add_(0.1)
        save_checkpoint(trained, other)
    model, report = load_model(None, ckpt)
    out = tmp_path / "export"
    manifest = export_model(model, weights_provenance(report), ExportRequest(out, precisions=("fp32",)))
    assert manifest["weights"]["sha256"] == sha256_file(ckpt) and manifest["precisions"] == ["fp32"]
    result = verify(out)
    assert result["passed"], result["failures"]
    with pytest.raises(UserError, match="weights differ"):
        verify(out, checkpoint=str(other))


def test_verify_on_a_folder_of_images(tiny_export, tmp_path):
    import cv2

    images = tmp_path / "imgs"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), np.random.default_rng(3).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    result = verify(tiny_export, precisions=("fp32",), images=images)
    assert result["passed"] and result["images"] == [str(images / "a.png")]
    with pytest.raises(UserError, match="no images"):
        verify(tiny_export, images=tmp_path)


@pytest.mark.slow
def test_fused_fp16_graphs_keep_attention_logits_in_fp32_and_pass_verify(fused_export):
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(fused_export / "decoder.fp16.onnx"))).graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in graph.value_info}
    attention = [n for n in graph.node if n.op_type == "Attention"]
    assert attention and "Softmax" not in {n.op_type for n in graph.node}  # one fused node per attention
    assert all(types[n.input[0]] == types[n.input[1]] == TensorProto.FLOAT for n in attention)
    assert [r.problems for r in lint_export(fused_export)] == [[], []]
    result = verify(fused_export)
    assert result["passed"], result["failures"]
    assert {r["precision"] for r in result["results"]} == {"fp16"}


def computed_in_fp16(folder, graph_name: str, node_of, inputs: int) -> str:
    """Rewrite one node of a real graph to compute in float16: its first `inputs` inputs cast down,
    its output cast back up to float32 (a valid graph, the FP32 island gone); the manifest records
    the new hash, so only lint's island check can object. Returns the node's name and float16 output."""
    path = folder / graph_name
    model = onnx.load(str(path))
    nodes = model.graph.node
    index, node = next((i, n) for i, n in enumerate(nodes) if node_of(n))
    casts = [helper.make_node("Cast", [name], [f"{name}_as_fp16"], to=TensorProto.FLOAT16) for name in node.input[:inputs]]
    for i in range(inputs):
        node.input[i] = f"{node.input[i]}_as_fp16"
    output = node.output[0]
    node.output[0] = f"{output}_fp16"
    up = helper.make_node("Cast", [node.output[0]], [output], to=TensorProto.FLOAT)
    stale = [vi for vi in model.graph.value_info if vi.name == output]
    for vi in stale:
        model.graph.value_info.remove(vi)
    for offset, extra in enumerate(casts):
        nodes.insert(index + offset, extra)
    nodes.insert(index + len(casts) + 1, up)
    onnx.save(model, str(path))
    manifest = read_manifest(folder)
    manifest["graphs"][graph_name]["sha256"] = sha256_file(path)
    write_manifest(folder, manifest)
    return node.name, node.output[0]


@pytest.mark.slow
def test_lint_fails_fp16_graphs_whose_attention_logits_left_fp32(tiny_export, fused_export, tmp_path):
    matmul, fused = tmp_path / "matmul", tmp_path / "fused"
    shutil.copytree(tiny_export, matmul)
    shutil.copytree(fused_export, fused)
    # matmul form: the logits' MatMul (the one feeding a Softmax through the bias Add) in float16
    graph = onnx.load(str(matmul / "decoder.fp16.onnx")).graph
    producers = {o: n for n in graph.node for o in n.output}
    softmax_in = producers[next(n for n in graph.node if n.op_type == "Softmax").input[0]]
    logits = next(producers[i] for i in softmax_in.input if i in producers and producers[i].op_type == "MatMul")
    _, fp16_logits = computed_in_fp16(matmul, "decoder.fp16.onnx", lambda n: n.name == logits.name, 2)
    reports = {r.graph: r.problems for r in lint_export(matmul, ("fp16",))}
    assert reports["encoder.fp16.onnx"] == [] and len(reports["decoder.fp16.onnx"]) == 1  # the one Softmax it feeds
    assert f"(Softmax): logits '{softmax_in.output[0]}' are float16 '{fp16_logits}' cast up" in reports["decoder.fp16.onnx"][0]
    # fused form: one Attention node reading float16 Q, K, V and mask, as exports before the island did
    name, _ = computed_in_fp16(fused, "encoder.fp16.onnx", lambda n: n.op_type == "Attention", 3)
    reports = {r.graph: r.problems for r in lint_export(fused)}
    assert reports["decoder.fp16.onnx"] == [] and len(reports["encoder.fp16.onnx"]) == 1
    assert f"{name} (Attention): Q " in reports["encoder.fp16.onnx"][0] and "FP32 island" in reports["encoder.fp16.onnx"][0]


@pytest.mark.slow
def test_absorbed_attention_exports_lint_and_verify(tiny, tmp_path):
    """A decoder whose cross-attentions fold the image side's projections (ois-tiny's weights,
    max_clicks 8, so (heads - 1) x max_clicks <= width) exports in both precisions, passes lint,
    and matches PyTorch FP32 under ONNX Runtime (and OpenVINO, where installed) within the usual
    tolerances: the folding holds in the graphs, not only in eager PyTorch."""
    import dataclasses
    import importlib.util

    from ois_deploy.export.onnx import ExportRequest, export_model
    from ois_deploy.export.quantize import fp32_groups
    from ois_deploy.model import OIS
    from ois_deploy.model.blocks import decoder_absorbs
    from ois_deploy.model.weights import save_checkpoint, weights_provenance

    cfg = dataclasses.replace(tiny.cfg, decoder=dataclasses.replace(tiny.cfg.decoder, max_clicks=8))
    assert decoder_absorbs(cfg.decoder)
    absorbing = OIS(cfg).eval()
    absorbing.load_state_dict(tiny.state_dict())
    ckpt, out = tmp_path / "absorbing.safetensors", tmp_path / "export"
    save_checkpoint(absorbing, ckpt)
    model, report = load_model(None, ckpt)
    export_model(model, weights_provenance(report), ExportRequest(out, precisions=("fp32", "fp16")))
    assert all(r.ok for r in lint_export(out)), [r.problems for r in lint_export(out)]
    decoder = onnx.load(str(out / "decoder.onnx"))
    per_head = {i.name for i in decoder.graph.initializer if len(i.dims) == 3}
    absorbed = {n.name for n in decoder.graph.node if n.op_type == "MatMul" and set(n.input) & per_head}
    assert len(absorbed) == 5 * (cfg.decoder.object_blocks + cfg.decoder.order_blocks)  # folded, not projected
    assert absorbed <= set(fp32_groups(decoder)["attention"])  # INT8 keeps them with the logits, in FP32
    backends = ["ort"] + (["openvino"] if importlib.util.find_spec("openvino") else [])
    for backend in backends:
        result = verify(out, backend=backend, precisions=("fp32",))
        assert result["passed"], (backend, result["failures"])
        rows = {r["output"]: r for r in result["results"]}
        assert rows["decoder/mask_logits"]["rel_l2"] < 1e-4, backend
    fp16 = verify(out, precisions=("fp16",))
    assert fp16["passed"], fp16["failures"]
