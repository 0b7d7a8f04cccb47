"""INT8 graphs (export/quantize.py): export, lint, verify and the runtime, on the trained ois-tiny.

One `export --precision int8` (fp32 + int8 graphs, about a minute) serves the whole module.
"""

import json

import numpy as np
import onnx
import pytest

from ois_deploy.cli import main
from ois_deploy.cli.export_cmds import parse_precisions
from ois_deploy.contract import read_manifest
from ois_deploy.errors import UserError
from ois_deploy.export.lint import lint_export
from ois_deploy.export.quantize import KEEP_FP32, fp32_groups
from ois_deploy.runtime.predictor import Predictor
from ois_deploy.runtime.preprocess import read_image
from ois_deploy.verify import ASSETS, TOLERANCES, verify


def run(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "ois-tiny"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--preset", "ois-tiny", "--out", str(out), "--precision", "int8"])
    assert exit_info.value.code == 0
    return out


def test_export_writes_int8_graphs_and_records_them(int8_export):
    manifest = read_manifest(int8_export)
    assert manifest["precisions"] == ["fp32", "int8"]  # fp32 is the quantization's source
    assert {"encoder.int8.onnx", "decoder.int8.onnx"} <= set(manifest["graphs"])
    record = manifest["int8"]
    assert record["fp32_groups"] == list(KEEP_FP32)
    calibration = record["calibration"]
    assert "demo.png" in calibration["images"] and any(n.startswith("scene[") for n in calibration["images"])
    assert calibration["decoder_samples"] > calibration["encoder_samples"] > 2
    # what stays FP32 is named node by node, and those nodes are still in the graph, unquantized
    for role in ("encoder", "decoder"):
        graph = onnx.load(str(int8_export / f"{role}.int8.onnx")).graph
        excluded = set(record["excluded_nodes"][role])
        assert excluded, role
        dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        kept = [n for n in graph.node if n.name in excluded]
        assert len(kept) == len(excluded)
        for node in kept:
            if node.op_type in ("Conv", "MatMul"):  # weights stay float: no DequantizeLinear feeds them
                assert not dequantized & set(node.input[1:]), node.name
        assert sum(n.op_type == "DequantizeLinear" for n in graph.node) > 10  # and the rest is quantized
        meta = {p.key: p.value for p in onnx.load(str(int8_export / f"{role}.int8.onnx")).metadata_props}
        assert meta["ois.precision"] == "int8" and meta["ois.role"] == role


def test_int8_graphs_pass_lint(int8_export):
    reports = lint_export(int8_export, ("int8",))
    assert [r.problems for r in reports] == [[], []]


def test_fp32_groups_follow_the_graph(int8_export):
    groups = fp32_groups(onnx.load(str(int8_export / "decoder.onnx")))
    ops = {n.name: n.op_type for n in onnx.load(str(int8_export / "decoder.onnx")).graph.node}
    assert {ops[n] for n in groups["layernorm"]} == {"LayerNormalization"}
    assert "Softmax" in {ops[n] for n in groups["attention"]} and "MatMul" in {ops[n] for n in groups["attention"]}
    assert [ops[n] for n in groups["logits_conv"]] == ["Conv"]
    assert groups["order_maps"] and "Abs" in {ops[n] for n in groups["order_maps"]}  # |D - D(click)|


def test_verify_int8_on_trained_weights(int8_export):
    """Measured (docs/design.md §4.1): on the trained ois-tiny the INT8 graphs stay within the
    int8 relative-L2 tolerance with no non-finite value, but their mask IoU mean (0.958 decoder,
    0.968 sessions) is under the 0.98 gate, so verify reports INT8 as failing, naming the IoU."""
    result = verify(int8_export, precisions=("int8",))
    assert result["tolerances"]["int8"]["mask_iou_mean"] == TOLERANCES["int8"]["mask_iou_mean"] == 0.98
    rows = {r["output"]: r for r in result["results"]}
    assert set(rows) == {"encoder/image_embed", "encoder/pyramid_l1", "encoder/pyramid_l2", "encoder/pyramid_l3",
                         "encoder/depth", "decoder/mask_logits", "session/mask_logits"}
    assert all(r["nonfinite"] == 0 and r["rel_l2"] <= TOLERANCES["int8"]["rel_l2"] for r in rows.values())
    assert rows["decoder/mask_logits"]["mask_iou_mean"] > 0.93 and rows["session/mask_logits"]["mask_iou_mean"] > 0.93
    assert all("mask IoU mean" in f for f in result["failures"])  # the gate, and only the gate
    assert result["passed"] == (not result["failures"])


def test_predictor_runs_int8_graphs(int8_export):
    image = read_image(ASSETS / "demo.png")
    with Predictor.open(str(int8_export), "ort", "int8") as int8, Predictor.open(str(int8_export), "ort", "fp32") as fp32:
        int8.set_image(image)
        fp32.set_image(image)
        got, want = int8.click(240, 180).mask, fp32.click(240, 180).mask
    assert got.shape == image.shape[:2]
    assert (got & want).sum() / max(1, (got | want).sum()) > 0.9


def test_verify_cli_int8_json(int8_export, tmp_path, capsys):
    out = tmp_path / "v.json"
    code, text, _ = run(["verify", str(int8_export), "--precision", "int8", "--json", str(out)], capsys)
    result = json.loads(out.read_text())
    assert code == (0 if result["passed"] else 1) and ("PASSED" if result["passed"] else "FAILED") in text
    assert {r["precision"] for r in result["results"]} == {"int8"}


def test_precision_lists():
    assert parse_precisions("int8", export=True) == ("fp32", "int8")
    assert parse_precisions("int8") == ("int8",)
    assert parse_precisions("fp16,int8", export=True) == ("fp32", "fp16", "int8")
    assert parse_precisions("both") == ("fp32", "fp16")
    assert parse_precisions("all") == ("fp32", "fp16", "int8")
    with pytest.raises(UserError):
        parse_precisions("int4")


def test_export_refuses_unknown_precision_in_one_line(tmp_path, capsys):
    code, _, err = run(["export", "--preset", "ois-tiny", "--out", str(tmp_path / "x"), "--precision", "fp32,int4"], capsys)
    assert code == 2 and err.strip().startswith("error:") and "int4" in err and len(err.strip().splitlines()) == 1
    assert np.all([not (tmp_path / "x" / f).exists() for f in ("manifest.json",)])
