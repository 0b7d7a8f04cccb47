"""AOTInductor packages on the CPU: `build --engine aoti` on ois-tiny, verify / predict / bench /
serve through the aoti backend, packages refused when their manifest entry does not fit, and a
build whose probe fails keeping nothing. The packages are built once per session (conftest's
aoti_export, about a minute on two cores)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import run_cli as run

from ois_deploy.errors import UserError
from ois_deploy.export.aoti import build_packages, describe_exit, probe_package
from ois_deploy.provenance import cpu_features
from ois_deploy.runtime.aoti_backend import cpu_isa_flags, package_dir
from ois_deploy.runtime.registry import RunnerSpec, open_runner

pytestmark = pytest.mark.slow
DEMO = "ois_deploy/assets/demo.png"
CLICK = "122,188,+"


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ois_deploy", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def built(aoti_export):
    """conftest's ois-tiny export with CPU FP32 packages, built through the CLI (shared with the
    backend contract); tests that change it work on a copy."""
    return aoti_export


def manifest_of(folder):
    return json.loads((folder / "manifest.json").read_text())


def copy_with(built, tmp_path, edit=None):
    folder = tmp_path / "copy"
    shutil.copytree(built, folder)
    if edit:
        manifest = manifest_of(folder)
        edit(manifest["aoti"]["cpu-fp32"])
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_build_records_packages_with_provenance(built):
    import torch

    from ois_deploy.provenance import sha256_file

    manifest = manifest_of(built)
    entry = manifest["aoti"]["cpu-fp32"]
    folder = package_dir(built, "cpu", "fp32")
    assert sorted(p.name for p in (built / "aoti").iterdir()) == ["cpu-fp32"]  # no staging left behind
    assert sorted(p.name for p in folder.iterdir()) == ["decoder.pt2", "encoder.pt2"]
    for name, digest in entry["files"].items():
        assert sha256_file(folder / name) == digest
    assert entry["torch"] == torch.__version__ and entry["device"] == "cpu" and entry["precision"] == "fp32"
    assert entry["model_hash"] == manifest["model_hash"]
    assert entry["cpu_flags"] and set(entry["cpu_flags"]) == set(cpu_isa_flags()) <= cpu_features()
    assert (entry["max_clicks"], entry["max_prompts"]) == (manifest["config"]["decoder"]["max_clicks"], 256)
    assert all(e < 1e-4 for e in entry["probe_rel_l2"].values())
    before = (built / "manifest.json").read_bytes()
    assert build_packages(built, "cpu", "fp32") == manifest  # up to date: nothing rebuilt
    assert (built / "manifest.json").read_bytes() == before


def test_verify_passes_fp32_tolerances(built, tmp_path, capsys):
    out = tmp_path / "verify.json"
    code, _, err = run(["verify", str(built), "--backend", "aoti", "--json", str(out)], capsys)
    result = json.loads(out.read_text())
    assert code in (None, 0), err
    assert result["passed"] and result["backend"] == "aoti"
    assert {r["precision"] for r in result["results"]} == {"fp32"}  # the precision packages exist for
    assert all(r["rel_l2"] < 1e-4 for r in result["results"])
    assert [r for r in result["results"] if r["output"] == "session/mask_logits"][0]["mask_iou_min"] >= 0.99


def test_decoder_at_dynamic_shapes_matches_torch(built):
    """P and N across their ranges, from one package: 1..max clicks, up to 256 prompt sets."""
    rng = np.random.default_rng(0)
    aoti = open_runner(RunnerSpec("aoti", str(built)))
    ref = open_runner(RunnerSpec("torch", str(built)))
    assert aoti.name == "aoti" and aoti.notes[0].startswith("packages: fp32 AOTInductor")
    s = aoti.cfg.input_size
    image = (rng.random((1, 3, s, s)) * 255).astype(np.float32)
    state_a, state_r = aoti.encode(image), ref.encode(image)
    for p, n in ((1, 1), (1, aoti.cfg.decoder.max_clicks), (256, 1)):
        coords = (rng.random((p, n, 2)) * (s - 1)).astype(np.float32)
        labels = np.ones((p, n), np.int32)
        prev = rng.random((p, 1, s, s)).astype(np.float32)
        got, want = aoti.decode(state_a, coords, labels, prev), ref.decode(state_r, coords, labels, prev)
        assert got.shape == want.shape
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4


def test_predict_and_bench_through_aoti(built, tmp_path, capsys):
    import cv2

    from ois_deploy.runtime.predictor import Predictor
    from ois_deploy.runtime.preprocess import read_image

    out = tmp_path / "mask.png"
    code, _, err = run(["predict", "--backend", "aoti", "--model", str(built), "--image", DEMO, "--click", CLICK,
                        "--out", str(out)], capsys)
    assert code in (None, 0), err
    got = cv2.imread(str(out), cv2.IMREAD_GRAYSCALE) > 0
    predictor = Predictor.open(str(built), "torch")
    predictor.set_image(read_image(DEMO))
    want = predictor.click(122, 188, True).mask
    assert got.any() and (got & want).sum() / (got | want).sum() >= 0.999
    record = tmp_path / "bench.json"
    code, _, err = run(["bench", str(built), "--backend", "aoti", "--clicks", "2", "--repeats", "1", "--no-sat",
                        "--json", str(record)], capsys)
    assert code in (None, 0), err
    result = json.loads(record.read_text())
    assert result["backend"] == "aoti" and result["precision"] == "fp32" and result["decoder_ms"]["p50"] > 0


def test_serve_through_aoti(built):
    import cv2
    import httpx
    from test_serve import start_serve, stop

    from ois_deploy.runtime.predictor import Predictor
    from ois_deploy.runtime.preprocess import read_image

    proc, url = start_serve(built, "--backend", "aoti")
    try:
        data = open(DEMO, "rb").read()
        with httpx.Client(base_url=url, timeout=60) as client:
            info = client.get("/v1/model").json()
            assert info["backend"] == "aoti"
            image_id = client.post("/v1/images", content=data).json()["image_id"]
            r = client.post(f"/v1/images/{image_id}/masks", json={"clicks": [{"x": 122, "y": 188, "positive": True}],
                                                                    "format": "png"})
            assert r.status_code == 200, r.text
    finally:
        assert stop(proc) == 0
    got = cv2.imdecode(np.frombuffer(__import__("base64").b64decode(r.json()["mask"]), np.uint8), cv2.IMREAD_GRAYSCALE) > 0
    predictor = Predictor.open(str(built), "torch")
    predictor.set_image(read_image(DEMO))
    want = predictor.click(122, 188, True).mask
    assert (got & want).sum() / (got | want).sum() >= 0.999


# An ISA extension this CPU lacks, for a package "compiled" for it; None on a CPU that has them all.
ABSENT_ISA = next((f for f in ("amx_tile", "amx_fp16", "avx512_fp16", "avx10_2", "sve2") if f not in cpu_features()), None)


def needs_absent_isa(entry):
    if ABSENT_ISA is None:
        pytest.skip("this CPU has every ISA extension the test could name as missing")
    entry.update(cpu_flags=entry["cpu_flags"] + [ABSENT_ISA])


@pytest.mark.parametrize("edit, words", [
    (lambda e: e.update(torch="2.0.0"), ["torch", "2.0.0"]),
    (needs_absent_isa, [f"lacks {ABSENT_ISA}"]),
    (lambda e: e.update(model_hash="0123456789abcdef"), ["weights"]),
    (lambda e: e.update(device="cuda"), ["device"]),
    (lambda e: e["files"].update({"decoder.pt2": "0" * 64}), ["decoder.pt2", "does not match"]),
], ids=["torch", "cpu-isa", "weights", "device", "file-hash"])
def test_mismatched_packages_refused(built, tmp_path, edit, words):
    folder = copy_with(built, tmp_path, edit)
    with pytest.raises(UserError) as info:
        open_runner(RunnerSpec("aoti", str(folder)))
    for word in words:
        assert word in str(info.value)
    assert "--rebuild" in str(info.value) or "ois-deploy build" in str(info.value)


def test_refusals_from_the_cli(built, tmp_path):
    from test_serve import assert_one_line_error

    folder = copy_with(built, tmp_path, lambda e: e.update(torch="2.0.0"))
    assert_one_line_error(cli("predict", "--backend", "aoti", "--model", str(folder), "--image", DEMO, "--click", CLICK,
                       "--out", str(tmp_path / "m.png")), "do not fit", "torch")
    assert not (tmp_path / "m.png").exists()
    assert_one_line_error(cli("verify", str(built), "--backend", "aoti", "--precision", "fp16"), "no fp16 AOTInductor packages")
    assert_one_line_error(cli("build", str(built), "--engine", "aoti", "--device", "cpu", "--workspace", "2"), "--workspace")
    assert_one_line_error(cli("build", str(built), "--engine", "tpu"), "--engine")


def test_failed_probe_keeps_nothing(built, tmp_path):
    """A probe that does not finish fails the build; the old packages and manifest stay as they were."""
    folder = copy_with(built, tmp_path)
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="encoder.pt2: the load-and-run probe did not finish"):
        build_packages(folder, "cpu", "fp32", rebuild=True, probe_timeout=0.01)
    after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before  # no staging folder, lock or half-written package left


def test_probe_of_a_broken_package_names_it_and_the_exit_status(built, tmp_path):
    import torch

    broken = tmp_path / "decoder.pt2"
    broken.write_bytes((package_dir(built, "cpu", "fp32") / "decoder.pt2").read_bytes()[:4096])
    with pytest.raises(UserError, match=r"decoder.pt2: the load-and-run probe process exited with status 1"):
        probe_package(broken, (torch.zeros(1),), torch.zeros(1), "cpu", 1e-4, timeout=120)
    assert describe_exit(-11) == "was killed by SIGSEGV" and describe_exit(3) == "exited with status 3"


def test_package_that_does_not_load_falls_back_to_torch_compile(built, tmp_path):
    from ois_deploy.provenance import sha256_file

    folder = copy_with(built, tmp_path)
    decoder = package_dir(folder, "cpu", "fp32") / "decoder.pt2"
    decoder.write_bytes(b"not a package")
    manifest = manifest_of(folder)
    manifest["aoti"]["cpu-fp32"]["files"]["decoder.pt2"] = sha256_file(decoder)  # recorded, yet unloadable
    (folder / "manifest.json").write_text(json.dumps(manifest))
    runner = open_runner(RunnerSpec("aoti", str(folder)))
    assert runner.name == "aoti"
    assert "did not load here" in runner.notes[0] and "torch.compile" in runner.notes[0]
