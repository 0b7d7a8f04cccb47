"""TensorRT and ONNX Runtime GPU logic that runs anywhere (profiles, provider options and the
provider check, dtype mapping, binding, provenance, refusals), and the GPU and TensorRT paths
themselves, which skip with a reason where those are missing. Batch splitting: test_batching.py."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import gpu_skip, has_cuda, has_tensorrt, ort_providers, run_cli as run

from ois_deploy.errors import UserError, first_line
from ois_deploy.export.tensorrt import check_attention, version_tuple
from ois_deploy.runtime.ort_backend import check_provider, open_session, session_providers, tensorrt_provider_options
from ois_deploy.runtime.profiles import INTERACTIVE, SAT, decoder_profiles
from ois_deploy.runtime.trt_backend import bindable, check_engines, engine_mismatches, load_engines, torch_dtype
from ois_deploy.model import get_preset

TINY = get_preset("ois-tiny")
S, G = TINY.input_size, TINY.grid  # ois-tiny's input side and token grid


def test_decoder_profiles():
    cfg = get_preset("ois-tiny")
    interactive, sat = decoder_profiles(cfg, max_clicks=24, max_prompts=256)
    assert interactive["point_coords"] == ((1, 1, 2), (1, 8, 2), (1, 24, 2))
    assert interactive["prev_mask"] == ((1, 1, S, S),) * 3
    assert sat["point_labels"] == ((1, 1), (256, 1), (256, 1))
    assert sat["prev_mask"][2] == (256, 1, S, S)
    assert interactive["image_embed"] == ((1, 64, G, G),) * 3  # image state fixed at batch 1
    small = decoder_profiles(cfg, max_clicks=4, max_prompts=16)[0]
    assert small["point_labels"] == ((1, 1), (1, 4), (1, 4))
    with pytest.raises(UserError, match="max-clicks"):
        decoder_profiles(cfg, max_clicks=25, max_prompts=16)
    with pytest.raises(UserError, match="max-prompts"):
        decoder_profiles(cfg, max_clicks=4, max_prompts=300)


def test_ort_tensorrt_provider_gets_one_profile_per_session_and_its_own_engine_cache(tmp_path):
    """ONNX Runtime's TensorRT provider parses several profiles (an input name repeated) but its
    execution context stays on the first, so each decoder session gets one profile; the engine
    cache is per profile (the provider rebuilds a cached engine whose recorded profile differs)."""
    cfg = get_preset("ois-tiny")
    interactive = tensorrt_provider_options(cfg, tmp_path, "decoder", INTERACTIVE)
    sat = tensorrt_provider_options(cfg, tmp_path, "decoder", SAT)
    assert interactive["trt_profile_min_shapes"] == f"point_coords:1x1x2,point_labels:1x1,prev_mask:1x1x{S}x{S}"
    assert interactive["trt_profile_max_shapes"] == f"point_coords:1x24x2,point_labels:1x24,prev_mask:1x1x{S}x{S}"
    assert sat["trt_profile_max_shapes"] == f"point_coords:256x1x2,point_labels:256x1,prev_mask:256x1x{S}x{S}"
    for options in (interactive, sat):  # never the merged [256,24] maximum of both
        assert options["trt_profile_max_shapes"].count("point_coords") == 1 and "256x24" not in options["trt_profile_max_shapes"]
        assert "image_embed" not in options["trt_profile_opt_shapes"]  # static inputs get no profile
        assert options["trt_timing_cache_path"] == str(tmp_path / "ort-trt-cache")
        assert options["trt_fp16_enable"] == "False"  # precision comes from the graph
    assert interactive["trt_engine_cache_path"] == str(tmp_path / "ort-trt-cache" / "interactive")
    assert sat["trt_engine_cache_path"] == str(tmp_path / "ort-trt-cache" / "sat")
    encoder = tensorrt_provider_options(cfg, tmp_path, "encoder")
    assert encoder["trt_profile_max_shapes"] == f"image:1x3x{S}x{S}"
    assert encoder["trt_engine_cache_path"] == str(tmp_path / "ort-trt-cache" / "encoder")
    providers = session_providers(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                                  cfg, tmp_path, "decoder", SAT)
    assert providers == [("TensorrtExecutionProvider", sat), ("CUDAExecutionProvider", {"use_tf32": "0"}),
                         "CPUExecutionProvider"]


def test_cuda_provider_runs_without_tf32(tmp_path):
    cfg = get_preset("ois-tiny")
    assert session_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], cfg, tmp_path, "encoder") == [
        ("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    assert session_providers(["CPUExecutionProvider"], cfg, tmp_path, "encoder") == ["CPUExecutionProvider"]


@pytest.mark.skipif("CUDAExecutionProvider" in ort_providers(), reason="onnxruntime-gpu with a CUDA provider is installed here")
def test_asking_for_cuda_on_cpu_onnxruntime_is_refused(tiny_export, capsys):
    """ONNX Runtime itself opens a CPU session when asked for CUDA it does not have (a warning,
    nothing more); our sessions refuse that, with one line naming the cause."""
    import onnxruntime

    path = tiny_export / "encoder.onnx"
    with pytest.warns(UserWarning, match="not in available provider names"):
        fallback = onnxruntime.InferenceSession(str(path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert fallback.get_providers() == ["CPUExecutionProvider"]  # the silent fallback this guards against
    with pytest.raises(UserError, match="opened encoder.onnx on CPUExecutionProvider, not the CUDAExecutionProvider "
                                        "asked for: the CUDA provider did not load"), pytest.warns(UserWarning):
        open_session(onnxruntime, path, onnxruntime.SessionOptions(),
                     [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"])
    for argv in (["verify", str(tiny_export), "--backend", "ort-cuda"],
                 ["predict", "--model", str(tiny_export), "--backend", "ort-trt", "--image", "ois_deploy/assets/demo.png",
                  "--click", "10,10,+", "--out", str(tiny_export / "never.png")]):
        code, _, err = run(argv, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, err
        assert "ONNX Runtime has no" in lines[0] and "install onnxruntime-gpu" in lines[0]
    assert not (tiny_export / "never.png").exists()


def test_provider_check_reads_the_session_not_the_request(tmp_path):
    check_provider(["CUDAExecutionProvider", "CPUExecutionProvider"], "CUDAExecutionProvider", tmp_path / "d.onnx")
    with pytest.raises(UserError, match="on CUDAExecutionProvider, not the TensorrtExecutionProvider asked for: "
                                        "the TensorRT provider did not load"):
        check_provider(["CUDAExecutionProvider", "CPUExecutionProvider"], "TensorrtExecutionProvider", tmp_path / "d.onnx")


def test_cpu_session_reports_the_provider_it_runs_on(tiny_export):
    from ois_deploy.runtime.ort_backend import OrtRunner

    runner = OrtRunner(tiny_export, "fp32", providers="cpu")
    assert runner.active_provider == "CPUExecutionProvider" and not runner.on_gpu and runner.device == "cpu"


def test_tensorrt_dtypes_map_to_torch():
    import torch

    assert torch_dtype("FLOAT") == torch.float32 and torch_dtype("HALF") == torch.float16
    assert torch_dtype("INT32") == torch.int32 and torch_dtype("BOOL") == torch.bool
    assert torch_dtype("BF16") == torch.bfloat16 and torch_dtype("UINT8") == torch.uint8

    class DataType:  # what a tensorrt.DataType member carries: its name
        name = "INT64"

    assert torch_dtype(DataType()) == torch.int64
    with pytest.raises(UserError, match="TensorRT type FP8"):
        torch_dtype("FP8")


def test_bindable_copies_what_tensorrt_cannot_read_in_place():
    import torch

    whole = torch.arange(4 * 64, dtype=torch.float32).reshape(4, 64)
    half = bindable(whole, torch.float16)  # a dtype the engine does not take is converted
    assert half.dtype == torch.float16 and torch.equal(half.float(), whole)
    strided = whole.t()
    copy = bindable(strided, torch.float32)
    assert copy.is_contiguous() and copy.data_ptr() != strided.data_ptr() and torch.equal(copy, strided)
    offset = whole.flatten()[1:]  # 4 bytes past the start: never 256-byte aligned
    moved = bindable(offset, torch.float32)
    assert moved.data_ptr() != offset.data_ptr() and torch.equal(moved, offset)
    if whole.data_ptr() % 256 == 0:  # (CPU memory is only 64-byte aligned: in-place use where it is aligned)
        assert bindable(whole, torch.float32) is whole


def test_a_failing_engine_load_closes_the_engines_loaded_before():
    closed = []

    class Engine:
        def __init__(self, role):
            if role == "decoder":
                raise UserError("TensorRT could not deserialise decoder.plan")
            self.role = role

        def close(self):
            closed.append(self.role)

    with pytest.raises(UserError, match="decoder.plan"):
        load_engines(Engine, ["encoder", "decoder"])
    assert closed == ["encoder"]
    assert list(load_engines(lambda role: role, ["encoder"])) == ["encoder"]


def test_fused_attention_needs_tensorrt_10_14(tmp_path):
    assert version_tuple("10.9.0.34") == (10, 9, 0, 34) and version_tuple("11.0.0rc1") == (11, 0)
    with pytest.raises(UserError, match="fused attention .* TensorRT parses from 10.14 on; this is TensorRT 10.13.3"):
        check_attention({"attention": "fused"}, "10.13.3", tmp_path)
    check_attention({"attention": "fused"}, "10.14.1.48", tmp_path)
    check_attention({"attention": "fused"}, "11.1.0", tmp_path)
    check_attention({"attention": "matmul"}, "10.9.0", tmp_path)


def test_first_line_of_an_empty_message():
    assert first_line(RuntimeError("")) == "RuntimeError"
    assert first_line(RuntimeError("\n  \nparser: node 3 failed\nmore")) == "parser: node 3 failed"


RUNTIME = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt": "10.13.0", "cuda": "13.0"}


def test_engine_provenance_matching():
    entry = {**RUNTIME, "graphs": {"encoder.fp16.onnx": "aa", "decoder.fp16.onnx": "bb"}}
    hashes = {"encoder.fp16.onnx": "aa", "decoder.fp16.onnx": "bb"}
    assert engine_mismatches(entry, RUNTIME, hashes) == []
    other = engine_mismatches(entry, {**RUNTIME, "gpu": "NVIDIA H200", "tensorrt": "11.0.0"}, hashes)
    assert other == [
        "gpu is 'NVIDIA H200' here but the engines were built for 'NVIDIA H100 80GB HBM3'",
        "tensorrt is '11.0.0' here but the engines were built for '10.13.0'",
    ]
    assert engine_mismatches(entry, RUNTIME, {**hashes, "decoder.fp16.onnx": "cc"}) == [
        "decoder.fp16.onnx changed since the engines were built"
    ]


def test_engines_are_refused_with_rebuild_advice(tmp_path):
    manifest = {"graphs": {"decoder.fp16.onnx": {"sha256": "bb"}}}
    with pytest.raises(UserError, match="no TensorRT engines .* run ois-deploy build"):
        check_engines(manifest, RUNTIME, tmp_path)
    manifest["engines"] = {**RUNTIME, "compute_capability": "8.0", "graphs": {}, "files": {}}
    with pytest.raises(UserError, match="compute_capability is '9.0' here .* --rebuild"):
        check_engines(manifest, RUNTIME, tmp_path)
    manifest["engines"] = {**RUNTIME, "graphs": {}, "files": {"encoder.plan": "x", "decoder.plan": "y"}}
    with pytest.raises(UserError, match="encoder.plan is missing"):
        check_engines(manifest, RUNTIME, tmp_path)


def test_package_import_does_not_import_tensorrt():
    code = "import sys, ois_deploy, ois_deploy.cli, ois_deploy.export.tensorrt, ois_deploy.verify; " \
           "print('tensorrt' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.skipif(has_tensorrt(), reason="TensorRT is installed: the refusal path does not apply")
def test_without_tensorrt_build_and_trt_refuse(tiny_export, capsys):
    code, _, err = run(["build", str(tiny_export)], capsys)
    assert code == 2 and "TensorRT is not installed" in err and "pip install 'ois-deploy[gpu]'" in err
    assert "engines" not in json.loads((tiny_export / "manifest.json").read_text())
    code, _, err = run(["verify", str(tiny_export), "--backend", "trt"], capsys)
    assert code == 2 and "TensorRT is not installed" in err


@pytest.mark.skipif(has_cuda(), reason="a CUDA GPU is present: the refusal path does not apply")
def test_without_cuda_torch_cuda_refuses(tiny_export, capsys):
    code, _, err = run(["verify", str(tiny_export), "--backend", "torch-cuda"], capsys)
    assert code == 2 and "needs a CUDA GPU" in err
    err_lines = [line for line in err.splitlines() if line.strip()]
    assert len(err_lines) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_torch_cuda_parity(tiny_export, precision):
    from ois_deploy.verify import verify

    result = verify(tiny_export, backend="torch-cuda", precisions=(precision,))
    assert result["passed"], result["failures"]


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda(), reason="needs a CUDA GPU")
def test_cuda_graph_decoder_matches_eager(tiny, rng):
    import copy

    from ois_deploy.runtime.torch_backend import TorchRunner

    graphs, eager = TorchRunner(copy.deepcopy(tiny), "cuda"), TorchRunner(copy.deepcopy(tiny), "cuda", cuda_graphs=False)
    assert graphs.graphs is not None and eager.graphs is None
    for _ in range(2):  # a second image reuses the captured graphs with the new state copied in
        image = rng.uniform(0, 255, (1, 3, S, S)).astype(np.float32)
        a, b = graphs.encode(image), eager.encode(image)
        for n in (1, 3, 1):
            coords = rng.uniform(0, S - 1, (1, n, 2)).astype(np.float32)
            labels = np.ones((1, n), np.int32)
            prev = rng.uniform(0, 1, (1, 1, S, S)).astype(np.float32)
            np.testing.assert_allclose(graphs.decode(a, coords, labels, prev), eager.decode(b, coords, labels, prev),
                                       atol=1e-4, rtol=1e-4)
    assert sorted(graphs.graphs.graphs) == [1, 3]


@pytest.mark.tensorrt
@pytest.mark.skipif(not (has_tensorrt() and has_cuda()), reason="needs TensorRT and a CUDA GPU")
def test_tensorrt_build_and_parity(tiny_export, tmp_path):
    import shutil

    from ois_deploy.export.tensorrt import build_engines
    from ois_deploy.verify import verify

    folder = tmp_path / "engines"
    shutil.copytree(tiny_export, folder)
    manifest = build_engines(folder, "fp16", timing_cache=str(tmp_path / "timing.cache"))
    assert (folder / "encoder.plan").is_file() and manifest["engines"]["precision"] == "fp16"
    assert (tmp_path / "timing.cache").is_file()
    result = verify(folder, backend="trt")  # decoder shapes include (3, 24) and (16, 5): split over the profiles
    assert result["passed"], result["failures"]

    from ois_deploy.runtime.trt_backend import TrtRunner

    with TrtRunner(folder) as runner:
        assert runner.on_gpu and not runner.thread_safe and runner.precision == "fp16"
        rng = np.random.default_rng(0)
        first = runner.encode(rng.uniform(0, 255, (1, 3, S, S)).astype(np.float32))
        kept = runner.state_to_numpy(first)
        second = runner.encode(rng.uniform(0, 255, (1, 3, S, S)).astype(np.float32))
        for name, array in runner.state_to_numpy(first).items():  # the second encode wrote fresh outputs
            np.testing.assert_array_equal(array, kept[name])
        assert first.image_embed.data_ptr() != second.image_embed.data_ptr()


@pytest.mark.gpu
@pytest.mark.parametrize("backend, provider", [("ort-cuda", "CUDAExecutionProvider"), ("ort-trt", "TensorrtExecutionProvider")])
def test_onnxruntime_gpu_providers_parity(tiny_export, tmp_path, backend, provider):
    if gpu_skip(backend):
        pytest.skip(gpu_skip(backend))
    import shutil

    from ois_deploy.runtime.ort_backend import OrtRunner
    from ois_deploy.verify import verify

    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    result = verify(folder, backend=backend)
    assert result["passed"], result["failures"]
    runner = OrtRunner(folder, "fp16", providers="cuda" if backend == "ort-cuda" else "tensorrt")
    assert runner.active_provider == provider and runner.on_gpu
    assert sorted(runner.decoders) == ([0, 1] if backend == "ort-trt" else [0])


def test_gpu_backends_refuse_another_device_or_precision(tiny_export):
    from ois_deploy.runtime.registry import RunnerSpec, open_runner

    with pytest.raises(UserError, match="backend ort-cuda runs on the cuda provider of a CUDA GPU, not on 'cpu'"):
        open_runner(RunnerSpec("ort-cuda", str(tiny_export), "fp32", device="cpu"))
    with pytest.raises(UserError, match="backend ort-trt runs on the tensorrt provider .* not on 'cpu'"):
        open_runner(RunnerSpec("ort-trt", str(tiny_export), "fp16", device="cpu"))
    with pytest.raises(UserError, match="TensorRT engines run on the CUDA GPU .* not on 'cpu'"):
        open_runner(RunnerSpec("trt", str(tiny_export), "fp16", device="cpu"))


def test_trt_refuses_a_precision_its_engines_do_not_hold(tiny_export, tmp_path):
    import shutil

    from ois_deploy.contract import read_manifest, write_manifest
    from ois_deploy.runtime.registry import RunnerSpec, open_runner

    folder = tmp_path / "engines"
    shutil.copytree(tiny_export, folder)
    manifest = read_manifest(folder)
    manifest["engines"] = {**RUNTIME, "precision": "fp16", "graphs": {}, "files": {}}  # as `build` records them
    write_manifest(folder, manifest)
    with pytest.raises(UserError, match="engines in .* are fp16: ask for --precision fp16, or run ois-deploy build"):
        open_runner(RunnerSpec("trt", str(folder), "fp32"))
