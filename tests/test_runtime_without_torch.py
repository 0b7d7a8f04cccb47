"""The runtime needs no PyTorch: predict, eval and bench on an ONNX Runtime export, in a process
where `import torch` fails, and one-line errors naming the extra for what does need it."""

import os
import subprocess
import sys

import pytest

from ois_deploy.train.scenes import write_davis

ASSETS = "ois_deploy/assets"


@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory):
    """PYTHONPATH with a `torch` package that refuses to import, ahead of the real one."""
    blocker = tmp_path_factory.mktemp("no-torch")
    (blocker / "torch").mkdir()
    (blocker / "torch" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    return {**os.environ, "PYTHONPATH": str(blocker)}


def cli(env, *args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ois_deploy", *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def test_torch_is_blocked(no_torch_env):
    result = subprocess.run([sys.executable, "-c", "import torch"], env=no_torch_env, capture_output=True, text=True)
    assert result.returncode != 0 and "No module named 'torch'" in result.stderr


def test_predict_eval_bench_without_torch(tiny_export, no_torch_env, tmp_path):
    mask = tmp_path / "mask.png"
    result = cli(no_torch_env, "predict", "--model", str(tiny_export), "--precision", "fp16",
                 "--image", f"{ASSETS}/demo.png", "--click", "122,188,+", "--out", str(mask))
    assert result.returncode == 0, result.stderr
    assert mask.is_file() and "% of the image" in result.stderr

    data = tmp_path / "scenes"
    write_davis(data, 1, seed=3)
    report = tmp_path / "eval.json"
    result = cli(no_torch_env, "eval", str(tiny_export), "--dataset", str(data), "--limit", "2", "--max-clicks", "3",
                 "--json", str(report))
    assert result.returncode == 0, result.stderr
    assert '"objects": 2' in report.read_text()

    result = cli(no_torch_env, "bench", str(tiny_export), "--clicks", "2", "--repeats", "1", "--no-sat", "--json", "-")
    assert result.returncode == 0, result.stderr
    assert '"backend": "ort"' in result.stdout and '"decoder_ms"' in result.stdout


def test_python_predictor_without_torch(tiny_export, no_torch_env):
    code = (
        "import sys, numpy as np\n"
        "from ois_deploy import Predictor\n"
        f"p = Predictor.open({str(tiny_export)!r}, backend='ort')\n"
        "p.set_image(np.zeros((60, 80, 3), np.uint8))\n"
        "print(p.click(10, 20).mask.shape, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=no_torch_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(60, 80) False"


@pytest.mark.parametrize("argv", [
    ["export", "--preset", "ois-tiny", "--out", "{tmp}/x"],
    ["verify", "{export}"],
    ["train", "--out", "{tmp}/w.safetensors", "--steps", "1"],
    ["predict", "--image", f"{ASSETS}/demo.png", "--click", "1,1,+", "--out", "{tmp}/m.png"],
])
def test_commands_needing_torch_name_the_extra(argv, tiny_export, no_torch_env, tmp_path):
    argv = [a.format(tmp=tmp_path, export=tiny_export) for a in argv]
    result = cli(no_torch_env, *argv)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "pip install 'ois-deploy[export]'" in lines[0], lines
    assert list(tmp_path.iterdir()) == []
