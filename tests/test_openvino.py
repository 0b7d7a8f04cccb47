"""The openvino backend on the trained ois-tiny: parity with PyTorch per precision, the
compiled-model cache, sharing a runner across threads, and what `bench` records about the ISA.

bf16 and int8 run where the CPU has the units (AVX512-BF16/AMX-BF16; VNNI/AMX-INT8) and skip
naming the missing flags elsewhere. The graphs: conftest's int8_export (fp32 + int8).
"""

import json
import shlex
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest

pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install 'ois-deploy[openvino]')")

from ois_deploy.cli.export_cmds import parse_precisions  # noqa: E402
from ois_deploy.contract import OPENVINO_INT8_DECODER, read_manifest, write_manifest  # noqa: E402
from ois_deploy.errors import UserError  # noqa: E402
from ois_deploy.provenance import sha256_file  # noqa: E402
from ois_deploy.runtime.openvino_backend import BF16_FLAGS, CACHE_DIR, OpenVinoRunner, missing_units  # noqa: E402
from ois_deploy.verify import ASSETS, TOLERANCES, verify  # noqa: E402

from conftest import run_cli as run  # noqa: E402


@pytest.fixture
def export_copy(int8_export, tmp_path):
    """A private copy of the export (without any compiled-model cache) that a test may change."""
    folder = tmp_path / "ois-tiny"
    shutil.copytree(int8_export, folder, ignore=shutil.ignore_patterns(CACHE_DIR))
    return folder


def blobs(folder):
    return {p.relative_to(folder): p.read_bytes() for p in (folder / CACHE_DIR).rglob("*.blob")}


def random_state_and_clicks(runner, rng, prompts=3, clicks=2):
    s = runner.cfg.input_size
    state = runner.encode((rng.random((1, 3, s, s)) * 255).astype(np.float32))
    coords = (rng.random((prompts, clicks, 2)) * (s - 1)).astype(np.float32)
    labels = np.ones((prompts, clicks), np.int32)
    prev = rng.random((prompts, 1, s, s)).astype(np.float32)
    return state, coords, labels, prev


@pytest.mark.slow
def test_verify_openvino_fp32_passes(int8_export, tmp_path, capsys):
    out_json = tmp_path / "verify.json"
    code, out, _ = run(["verify", str(int8_export), "--backend", "openvino", "--precision", "fp32",
                        "--json", str(out_json)], capsys)
    result = json.loads(out_json.read_text())
    assert code == 0 and result["passed"], result["failures"]
    assert [r["precision"] for r in result["results"]] == ["fp32"] * len(result["results"])
    assert max(r["rel_l2"] for r in result["results"]) <= TOLERANCES["fp32"]["rel_l2"]
    assert result["providers"] == ["OpenVINO CPU (f32)"]


@pytest.mark.slow
@pytest.mark.parametrize("precision, executes_in", [("bf16", "bf16"), ("int8", "f32")])
def test_verify_openvino_reduced_precisions(int8_export, precision, executes_in):
    """bf16: the fp32 graphs in BF16; int8: the QDQ graphs, their kept-FP32 nodes in FP32."""
    if missing := missing_units(precision):
        pytest.skip(missing)
    result = verify(int8_export, backend="openvino", precisions=(precision,))
    assert result["passed"], result["failures"]
    assert result["providers"] == [f"OpenVINO CPU ({executes_in})"]
    # the reduced precision is really in use: errors well above FP32's
    assert max(r["rel_l2"] for r in result["results"]) > 10 * TOLERANCES["fp32"]["rel_l2"]


def predict_bf16(int8_export, mask, capsys):
    return run(["predict", "--backend", "openvino", "--model", str(int8_export), "--precision", "bf16",
                "--image", str(ASSETS / "demo.png"), "--click", "122,188,+", "--out", str(mask)], capsys)


def test_bf16_runs_where_the_cpu_has_the_units(int8_export, tmp_path, capsys):
    if missing := missing_units("bf16"):
        pytest.skip(missing)
    code, _, err = predict_bf16(int8_export, tmp_path / "mask.png", capsys)
    assert code == 0 and (tmp_path / "mask.png").is_file(), err


def test_bf16_on_a_cpu_without_the_units_names_them(int8_export, tmp_path, capsys, monkeypatch):
    """On any CPU: /proc/cpuinfo's flags read without AVX512-BF16 and AMX-BF16."""
    import ois_deploy.provenance as provenance

    flags = provenance.cpu_features() - set(BF16_FLAGS)
    monkeypatch.setattr(provenance, "cpu_features", lambda: flags)
    code, _, err = predict_bf16(int8_export, tmp_path / "mask.png", capsys)
    assert code == 2 and "bf16 needs a CPU with avx512_bf16 or amx_bf16" in err and "Traceback" not in err
    assert not (tmp_path / "mask.png").exists()


def test_precision_without_graphs_is_refused(export_copy, capsys):
    manifest = read_manifest(export_copy)
    manifest["precisions"] = ["fp32"]
    manifest["graphs"] = {k: v for k, v in manifest["graphs"].items() if v["precision"] == "fp32"}
    write_manifest(export_copy, manifest)
    code, _, err = run(["bench", str(export_copy), "--backend", "openvino", "--precision", "int8"], capsys)
    assert code == 2 and "has no int8 graphs" in err and "--precision fp32,int8" in err


def test_compiled_model_cache_is_reused_and_never_stale(export_copy, rng):
    first = OpenVinoRunner(export_copy, "fp32")
    assert first.loaded_from_cache == {"encoder": False, "decoder": False}
    compiled = blobs(export_copy)
    assert len(compiled) == 2  # one blob per graph, each in its own keyed folder
    state, coords, labels, prev = random_state_and_clicks(first, rng, prompts=1)  # P > 1 compiles a third
    before = first.decode(state, coords, labels, prev)

    second = OpenVinoRunner(export_copy, "fp32")
    assert second.loaded_from_cache == {"encoder": True, "decoder": True}
    assert blobs(export_copy) == compiled  # read, not rewritten, nothing added
    np.testing.assert_array_equal(second.decode(state, coords, labels, prev), before)

    # A changed decoder graph at the same path (manifest updated, as a re-export does): its logits + 1.
    path = export_copy / "decoder.onnx"
    graph = onnx.load(str(path))
    last = graph.graph.node[-1]
    last.output[0] = "mask_logits_before"
    graph.graph.initializer.append(onnx.numpy_helper.from_array(np.array(1.0, np.float32), "one"))
    graph.graph.node.append(onnx.helper.make_node("Add", ["mask_logits_before", "one"], ["mask_logits"]))
    onnx.save(graph, str(path))
    manifest = read_manifest(export_copy)
    manifest["graphs"]["decoder.onnx"]["sha256"] = sha256_file(path)
    write_manifest(export_copy, manifest)

    changed = OpenVinoRunner(export_copy, "fp32")
    assert changed.loaded_from_cache == {"encoder": True, "decoder": False}
    assert len(blobs(export_copy)) == 3 and set(compiled) < set(blobs(export_copy))
    np.testing.assert_allclose(changed.decode(state, coords, labels, prev), before + 1, atol=1e-4)


def test_runner_shared_across_threads_with_streams(int8_export, rng):
    runner = OpenVinoRunner(int8_export, "fp32", threads=2, streams=2)
    assert runner.runtime_info["num_streams"] == 2 and runner.runtime_info["threads"] == 2
    state, coords, labels, prev = random_state_and_clicks(runner, rng, prompts=6, clicks=3)
    jobs = [(coords[i : i + 1], labels[i : i + 1], prev[i : i + 1]) for i in range(len(coords))]
    sequential = [runner.decode(state, *job) for job in jobs]
    with ThreadPoolExecutor(3) as pool:
        parallel = list(pool.map(lambda job: runner.decode(state, *job), jobs))
    for got, want in zip(parallel, sequential):
        np.testing.assert_array_equal(got, want)
    # and all prompt sets in one call (the decoder broadcasts the image state over them)
    np.testing.assert_allclose(runner.decode(state, coords, labels, prev), np.concatenate(sequential), atol=1e-4)


@pytest.mark.slow
def test_bench_records_the_isa_the_runtime_used(int8_export, tmp_path, capsys):
    code, _, err = run(["bench", str(int8_export), "--backend", "openvino", "--clicks", "2", "--repeats", "1", "--no-sat",
                        "--results-dir", str(tmp_path)], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "bench.jsonl").read_text().splitlines()[-1])
    isa = record["runtime_isa"]
    assert record["backend"] == "openvino" and isa["execution_precision"] == "f32"
    assert "FP32" in isa["openvino_capabilities"] and "amx_bf16" in isa["cpu_flags"]


def test_bf16_is_a_runtime_precision_not_an_export(capsys, tmp_path):
    assert parse_precisions("fp32,bf16") == ("fp32", "bf16")
    code, _, err = run(["export", "--preset", "ois-tiny", "--precision", "bf16", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "bf16 runs the fp32 graphs" in err and not (tmp_path / "x").exists()


def test_int8_export_has_an_nncf_decoder_that_the_runner_runs_on_request(int8_export, rng):
    pytest.importorskip("nncf", reason="nncf (the openvino extra) is not installed")
    manifest = read_manifest(int8_export)
    record = manifest["int8"]["openvino"]
    assert set(record["files"]) == set(OPENVINO_INT8_DECODER)
    for name, digest in record["files"].items():
        assert sha256_file(int8_export / name) == digest
    assert record["calibration_samples"] == manifest["int8"]["calibration"]["decoder_samples"]
    assert "FakeQuantize" in (int8_export / OPENVINO_INT8_DECODER[0]).read_text()  # quantized by NNCF
    assert OpenVinoRunner(int8_export, "int8", cache=False).paths["decoder"].name == "decoder.int8.onnx"  # default
    nncf = OpenVinoRunner(int8_export, "int8", cache=False, int8_decoder="nncf")
    fp32 = OpenVinoRunner(int8_export, "fp32", cache=False)
    assert nncf.paths["decoder"].name == OPENVINO_INT8_DECODER[0]
    # within verify's int8 tolerance of FP32 on the same state and clicks (a first click: no
    # previous mask), and not identical to it
    state, coords, labels, _ = random_state_and_clicks(fp32, rng, prompts=1)
    prev = fp32.empty_prev()
    want = fp32.decode(state, coords, labels, prev)
    got = nncf.decode(nncf.state_from_numpy(fp32.state_to_numpy(state)), coords, labels, prev)
    rel_l2 = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 0 < rel_l2 < TOLERANCES["int8"]["rel_l2"]


def test_nncf_decoder_missing_or_changed_is_refused(export_copy):
    pytest.importorskip("nncf", reason="nncf (the openvino extra) is not installed")
    weights = export_copy / OPENVINO_INT8_DECODER[1]
    weights.write_bytes(weights.read_bytes() + b"\0")  # edited after export
    with pytest.raises(UserError, match="does not match its manifest"):
        OpenVinoRunner(export_copy, "int8", cache=False, int8_decoder="nncf")
    weights.unlink()
    with pytest.raises(UserError, match="missing"):
        OpenVinoRunner(export_copy, "int8", cache=False, int8_decoder="nncf")
    manifest = read_manifest(export_copy)
    manifest["int8"].pop("openvino")
    write_manifest(export_copy, manifest)
    with pytest.raises(UserError, match="no OpenVINO INT8 decoder"):
        OpenVinoRunner(export_copy, "int8", cache=False, int8_decoder="nncf")


@pytest.fixture(scope="module")
def one_scene(tmp_path_factory):
    """A generated DAVIS-layout folder of one scene (`ois-deploy scenes`)."""
    from ois_deploy.cli import main

    out = tmp_path_factory.mktemp("scenes") / "one"
    with pytest.raises(SystemExit) as exit_info:
        main(["scenes", "--out", str(out), "--count", "1", "--seed", "3"])
    assert exit_info.value.code == 0
    return out


@pytest.mark.slow
def test_cli_runs_the_nncf_decoder_on_request(int8_export, one_scene, tmp_path, capsys):
    """`--int8-decoder nncf`: bench times OpenVINO's own INT8 decoder, and eval records which
    decoder, the command, the CPU's flags and the load average beside its figures (the task-parity protocol)."""
    pytest.importorskip("nncf", reason="nncf (the openvino extra) is not installed")
    int8 = ["--backend", "openvino", "--precision", "int8", "--int8-decoder", "nncf"]
    code, _, err = run(["bench", str(int8_export), *int8, "--clicks", "1", "--repeats", "1", "--no-sat",
                        "--json", str(tmp_path / "bench.json")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "bench.json").read_text())["runtime_isa"]["decoder_graph"] == OPENVINO_INT8_DECODER[0]
    argv = ["eval", str(int8_export), "--dataset", str(one_scene), *int8, "--limit", "1", "--max-clicks", "2",
            "--json", str(tmp_path / "eval.json")]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["int8_decoder"] == "nncf" and report["objects"] == 1
    assert report["command"] == shlex.join(["ois-deploy", *argv])
    assert set(report["machine"]["cpu_flags"]) >= {"avx512_vnni", "amx_int8"}
    assert all(len(report["load_average"][k]) == 3 for k in ("before", "after"))


@pytest.mark.parametrize("options, message", [
    (["--backend", "openvino", "--precision", "int8", "--int8-decoder", "fp8"], "int8 decoder must be one of qdq, nncf, not 'fp8'"),
    (["--backend", "ort", "--precision", "int8", "--int8-decoder", "nncf"], "applies to --backend openvino --precision int8 only"),
    (["--backend", "openvino", "--precision", "fp32", "--int8-decoder", "nncf"], "applies to --backend openvino --precision int8 only"),
])
def test_int8_decoder_option_bad_values(int8_export, one_scene, tmp_path, capsys, options, message):
    """Refused in one line, exit 2, nothing written, by every command that opens a runner."""
    out = tmp_path / "out"
    for argv in (["eval", str(int8_export), "--dataset", str(one_scene), "--json", str(out / "eval.json")],
                 ["bench", str(int8_export), "--json", str(out / "bench.json")],
                 ["predict", "--model", str(int8_export), "--image", str(ASSETS / "demo.png"), "--click", "10,10,+",
                  "--out", str(out / "mask.png")]):
        out.mkdir(exist_ok=True)
        code, _, err = run(argv + options, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not any(out.iterdir())


def test_verify_int8_decoder_refused_before_the_run(int8_export, capsys):
    code, _, err = run(["verify", str(int8_export), "--backend", "openvino", "--precision", "fp32",
                        "--int8-decoder", "nncf"], capsys)
    assert code == 2 and "applies to the int8 precision, which is not checked here" in err, err
    code, _, err = run(["verify", str(int8_export), "--backend", "ort", "--precision", "int8", "--int8-decoder", "nncf"],
                       capsys)
    assert code == 2 and "applies to --backend openvino --precision int8 only" in err, err
