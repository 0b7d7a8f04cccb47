"""`ois-deploy bench --profile`: each CPU runtime's own per-node counters of a click's decoder
call (OpenVINO's PERF_COUNT, ONNX Runtime's profiler), on the trained ois-tiny."""

import json

import numpy as np
import pytest

from conftest import run_cli
from ois_deploy.runtime.ort_backend import OrtRunner

# The node types that do the decoder's work, as each runtime names them.
WORK_TYPES = {"openvino": ("Convolution", "FullyConnected"), "ort": ("Conv", "MatMul")}


def bench_profile(export, backend, tmp_path, capsys) -> dict:
    out = tmp_path / f"{backend}.json"
    code, stdout, err = run_cli(["bench", str(export), "--backend", backend, "--profile", "--no-sat", "--clicks", "1",
                                 "--repeats", "2", "--json", str(out)], capsys)
    assert code == 0, err
    assert "node type" in stdout  # the per-type table is printed
    return json.loads(out.read_text())["profile"]


@pytest.mark.parametrize("backend", ["openvino", "ort"])
def test_bench_profile_has_the_runtimes_node_types(int8_export, backend, tmp_path, capsys):
    if backend == "openvino":
        pytest.importorskip("openvino", reason="the openvino extra is not installed")
    profile = bench_profile(int8_export, backend, tmp_path, capsys)
    assert profile["calls"] == 3  # max(3, repeats)
    types = {row["type"]: row for row in profile["by_type"]}
    for work in WORK_TYPES[backend]:
        assert types[work]["ms"] > 0 and types[work]["nodes"] >= 1
    # rows add up to the nodes' total, which is of the order of a call's wall time (node times may
    # overlap where the runtime runs independent nodes at once)
    assert sum(row["ms"] for row in profile["by_type"]) == pytest.approx(profile["nodes_ms"], rel=1e-6)
    assert sum(row["share"] for row in profile["by_type"]) == pytest.approx(1.0, rel=1e-6)
    assert 0.2 * profile["call_ms"] < profile["nodes_ms"] < 10 * profile["call_ms"]
    # the slowest nodes are real nodes of those types, slowest first
    top = [n["ms"] for n in profile["top_nodes"]]
    assert top == sorted(top, reverse=True) and profile["top_nodes"][0]["type"] in types
    assert all(c["type"] in types for c in profile["conversions"])


def test_profile_needs_a_runtime_with_counters(capsys):
    code, _, err = run_cli(["bench", "ois-tiny", "--backend", "torch", "--profile", "--no-sat", "--clicks", "1"], capsys)
    assert code == 2 and "torch has no per-node profile" in err and "Traceback" not in err


def test_an_ort_runner_opened_without_profile_refuses(int8_export):
    from ois_deploy.errors import UserError

    runner = OrtRunner(int8_export)
    s = runner.cfg.input_size
    state = runner.encode(np.zeros((1, 3, s, s), np.float32))
    with pytest.raises(UserError, match="profile=True"):
        runner.profile_decode(state, np.zeros((1, 1, 2), np.float32), np.ones((1, 1), np.int32), runner.empty_prev(), 1)
