import ast
from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
DAV2_KEYS = FIXTURES / "depth_anything_v2"


def dav2_key_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an official Depth Anything V2 checkpoint, from the fixture lists."""
    path = DAV2_KEYS / f"{variant}_state_dict_keys.tsv"
    assert path.is_file(), f"fixture missing: {path}"
    shapes = {}
    for line in path.read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")
            shapes[key] = tuple(ast.literal_eval(shape))
    return shapes


def synthetic_dav2_state_dict(variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.02 for k, s in dav2_key_shapes(variant).items()}


@pytest.fixture(scope="session")
def tiny():
    """The ois-tiny reference model with its bundled trained weights, eval mode."""
    from ois_deploy.model.weights import load_model

    model, _ = load_model("ois-tiny")
    return model


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """One export of ois-tiny (bundled weights; fp32 + fp16) for the whole run: exporting takes
    about a minute."""
    from ois_deploy.export.onnx import ExportRequest, export_model
    from ois_deploy.model.weights import load_model, weights_provenance

    out = tmp_path_factory.mktemp("export") / "ois-tiny"
    model, report = load_model("ois-tiny")
    export_model(model, weights_provenance(report), ExportRequest(out))
    return out


@pytest.fixture(scope="session")
def int8_export(tmp_path_factory):
    """One `export --precision int8` of ois-tiny (bundled weights; fp32 + int8 graphs) for the
    whole run: tests/test_int8.py and tests/test_openvino.py."""
    from ois_deploy.cli import main

    out = tmp_path_factory.mktemp("int8") / "ois-tiny"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--preset", "ois-tiny", "--out", str(out), "--precision", "int8"])
    assert exit_info.value.code == 0
    return out


def has_cuda() -> bool:
    return torch.cuda.is_available()


def ort_providers() -> list[str]:
    import onnxruntime

    return onnxruntime.get_available_providers()


def has_tensorrt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def gpu_skip(backend: str) -> str | None:
    """Why a GPU backend (torch-cuda, ort-cuda, ort-trt, trt) cannot run here, or None."""
    if not has_cuda():
        return "needs a CUDA GPU visible to PyTorch"
    if backend == "ort-cuda" and "CUDAExecutionProvider" not in ort_providers():
        return "onnxruntime here has no CUDAExecutionProvider (onnxruntime-gpu is not installed)"
    if backend == "ort-trt" and "TensorrtExecutionProvider" not in ort_providers():
        return "onnxruntime here has no TensorrtExecutionProvider (onnxruntime-gpu is not installed)"
    if backend in ("trt", "ort-trt") and not has_tensorrt():
        return "TensorRT is not installed (pip install 'ois-deploy[gpu]')"
    return None


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of `ois-deploy ARGV` run in this process."""
    from ois_deploy.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def aoti_export(tiny_export, tmp_path_factory):
    """A copy of the ois-tiny export with CPU FP32 AOTInductor packages, built once through the
    CLI (`build --engine aoti`): 1-2 min on two idle cores, 10 min seen under load."""
    import shutil
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("aoti") / "ois-tiny"
    shutil.copytree(tiny_export, folder)
    done = subprocess.run([sys.executable, "-m", "ois_deploy", "build", str(folder), "--engine", "aoti", "--device", "cpu"],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr
    assert "AOTInductor packages in" in done.stderr
    return folder
