"""benchmarks/gpu_engines.sh, the one command for a lent GPU machine, run end to end on the CPU
(--cpu-smoke: ois-tiny, one repetition, GPU-only steps skipped) as a GPU run would go."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_script_runs_end_to_end_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OIS_GPU_WORK": str(tmp_path / "work"), "OIS_SITE": str(tmp_path / "site")}
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "benchmarks/gpu_engines.sh", "--cpu-smoke", "--out", str(out), "--budget-s", "900"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    record = json.loads((out / "gpu_engines.json").read_text())
    steps = record["steps"]
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert record["mode"] == "cpu-smoke" and record["date"] and record["versions"]["torch"] and record["machine"]["cpu"]
    assert not [name for name, step in steps.items() if step["status"] == "failed"]
    assert steps["pytest -m gpu"] == {"status": "skipped", "why": "GPU-only step (--cpu-smoke)"}
    assert steps["facts"]["result"]["cuda_available"] is False

    for name in ("bench ois-tiny fp32 torch", "Predictor ois-tiny fp32 torch", "SAT chunks ois-tiny fp32 torch",
                 "peer OIS ois-tiny", "export ois-tiny", "verify ois-tiny torch"):
        assert steps[name]["status"] == "ok", name
    assert steps["bench ois-tiny fp32 torch"]["result"]["decoder_ms"]["p50"] > 0
    session = steps["Predictor ois-tiny fp32 torch"]["result"]
    assert session["click_ms_p50"] > 0 and session["set_image_ms_p50"] > 0 and session["click_mask_only_ms_p50"] > 0
    assert steps["SAT chunks ois-tiny fp32 torch"]["result"]["chunk_1_ms"] > 0
    assert steps["verify ois-tiny torch"]["result"]["passed"] is True
    assert (out / "bench.jsonl").is_file()

    aoti = steps["facts"]["result"]["aoti_build"]
    if aoti:
        assert steps["verify ois-tiny fp32 aoti"]["result"]["passed"] is True
    else:  # the AOTInductor half of issue 32 is not in this checkout
        assert "--engine" in steps["aoti ois-tiny fp32"]["why"]
    # TensorRT and ONNX Runtime's GPU providers: skipped with the reason, per backend
    assert steps["facts"]["result"]["gpu_backends"] == dict.fromkeys(("trt", "ort-cuda", "ort-trt"), "no CUDA GPU here")
    for backend in ("trt", "ort-cuda", "ort-trt"):
        assert steps[f"{backend} ois-tiny fp32"] == {"status": "skipped", "why": "no CUDA GPU here"}
    for peer in ("peer SAM 2.1 hiera-b+", "peer SAM vit_h", "peer SAM vit_b"):
        assert steps[peer]["status"] == "skipped"


def test_gpu_run_without_a_gpu_says_so():
    proc = subprocess.run([sys.executable, "benchmarks/gpu_engines.py", "--out", "/nonexistent-never-written"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode != 0 and "--cpu-smoke" in proc.stderr
