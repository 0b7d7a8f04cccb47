"""TensorRT engine logic that runs anywhere (profiles, provenance, refusals), and the GPU and
TensorRT paths themselves, which skip with a reason where those are missing."""

import importlib.util
import json
import subprocess
import sys

import pytest

from ois_deploy.cli import main
from ois_deploy.runtime.ort_backend import session_providers, tensorrt_provider_options
from ois_deploy.runtime.profiles import INTERACTIVE, SAT, decoder_profiles, select_profile, union_profile
from ois_deploy.runtime.trt_backend import check_engines, engine_mismatches
from ois_deploy.errors import UserError
from ois_deploy.model import get_preset

TINY = get_preset("ois-tiny")
S, G = TINY.input_size, TINY.grid  # ois-tiny's input side and token grid

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def has_cuda():
    import torch

    return torch.cuda.is_available()


def run(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    return info.value.code, out, err


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


def test_ort_tensorrt_provider_gets_caches_and_one_profile_covering_both(tmp_path):
    cfg = get_preset("ois-tiny")
    union = union_profile(decoder_profiles(cfg, max_clicks=24, max_prompts=256))
    assert union["point_coords"] == ((1, 1, 2), (1, 8, 2), (256, 24, 2))  # interactive optimum
    options = tensorrt_provider_options(cfg, tmp_path, "decoder")
    assert options["trt_engine_cache_path"] == options["trt_timing_cache_path"] == str(tmp_path / "ort-trt-cache")
    assert options["trt_profile_min_shapes"] == f"point_coords:1x1x2,point_labels:1x1,prev_mask:1x1x{S}x{S}"
    assert options["trt_profile_max_shapes"] == f"point_coords:256x24x2,point_labels:256x24,prev_mask:256x1x{S}x{S}"
    assert "image_embed" not in options["trt_profile_opt_shapes"]  # static inputs get no profile
    assert tensorrt_provider_options(cfg, tmp_path, "encoder")["trt_profile_max_shapes"] == f"image:1x3x{S}x{S}"
    providers = session_providers(["TensorrtExecutionProvider", "CUDAExecutionProvider"], cfg, tmp_path, "decoder")
    assert providers[0][0] == "TensorrtExecutionProvider" and providers[0][1] == options
    assert providers[1] == "CUDAExecutionProvider"


def test_profile_selection():
    assert select_profile(1, 1, 24, 256) == INTERACTIVE
    assert select_profile(1, 24, 24, 256) == INTERACTIVE
    assert select_profile(256, 1, 24, 256) == SAT
    assert select_profile(2, 1, 24, 256) == SAT
    with pytest.raises(UserError, match="no engine profile for 3 prompt sets of 2 clicks"):
        select_profile(3, 2, 24, 256)
    with pytest.raises(UserError, match="no engine profile"):
        select_profile(1, 10, 8, 256)


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


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed: the refusal path does not apply")
def test_without_tensorrt_build_and_trt_refuse(tiny_export, capsys):
    code, _, err = run(["build", str(tiny_export)], capsys)
    assert code == 2 and "TensorRT is not installed" in err and "pip install tensorrt" in err
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

    import numpy as np

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
@pytest.mark.skipif(not (HAS_TRT and has_cuda()), reason="needs TensorRT and a CUDA GPU")
def test_tensorrt_build_and_parity(tiny_export, tmp_path):
    import shutil

    from ois_deploy.export.tensorrt import build_engines
    from ois_deploy.verify import verify

    folder = tmp_path / "engines"
    shutil.copytree(tiny_export, folder)
    manifest = build_engines(folder, "fp16", timing_cache=str(tmp_path / "timing.cache"))
    assert (folder / "encoder.plan").is_file() and manifest["engines"]["precision"] == "fp16"
    assert (tmp_path / "timing.cache").is_file()
    result = verify(folder, backend="trt")
    assert result["passed"], result["failures"]
