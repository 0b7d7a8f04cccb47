"""The command line, run in-process through its real entry point."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors import safe_open

from ois_deploy.model import OIS, get_preset
from ois_deploy.model.weights import load_model, save_checkpoint

from conftest import synthetic_dav2_state_dict, run_cli as run


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "img.png"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 256, (90, 160, 3), dtype=np.uint8))
    return path


def test_info_json_to_stdout(capsys):
    code, out, err = run(["info", "--preset", "ois-b-1024", "--json", "-"], capsys)
    assert code == 0
    data = json.loads(out)  # nothing but JSON on stdout
    assert data["preset"] == "ois-b-1024" and data["input_size"] == 1022
    assert data["params"]["encoder"] + data["params"]["depth_head"] == 97_470_785
    assert data["params"]["total"] == sum(data["params"][k] for k in ("encoder", "depth_head", "decoder"))
    assert data["weights"]["format"] == "random" and data["weights"]["path"] is None
    assert "random init" in err


def test_info_with_official_dav2_file(tmp_path, capsys):
    path = tmp_path / "depth_anything_v2_vitb.pth"
    torch.save(synthetic_dav2_state_dict("vitb"), path)
    code, out, err = run(["info", "--checkpoint", str(path), "--json", "-"], capsys)
    assert code == 0
    w = json.loads(out)["weights"]
    assert (w["loaded_keys"], w["missing"], w["unexpected"]) == (239, [], [])
    assert w["format"] == "dav2-vitb" and "random init" in w["decoder"]
    assert "CC-BY-NC-4.0" in err and "no OIS decoder" in err


def test_info_lists_mismatches_and_exits_2(tmp_path, capsys):
    state = synthetic_dav2_state_dict("vits")
    del state["pretrained.blocks.0.norm1.bias"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    report = tmp_path / "report.json"
    code, out, err = run(["info", "--checkpoint", str(path), "--json", str(report)], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and err.startswith("error:")
    assert json.loads(report.read_text())["weights"]["missing"] == ["pretrained.blocks.0.norm1.bias"]


def test_predict_writes_mask_and_overlay(image_file, tmp_path, capsys):
    out, overlay = tmp_path / "mask.png", tmp_path / "overlay.png"
    code, _, err = run(
        ["predict", "--preset", "ois-tiny", "--image", str(image_file), "--click", "80,45,+", "--click", "10,10,-",
         "--out", str(out), "--overlay", str(overlay)],
        capsys,
    )
    assert code == 0, err
    mask = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (90, 160) and set(np.unique(mask)) <= {0, 255}
    assert cv2.imread(str(overlay)).shape == (90, 160, 3)
    assert "bundled default" in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--image", "missing.png", "--click", "1,1,+"], "image not found"),
        (["--image", "{bad}", "--click", "1,1,+"], "cannot read image"),
        (["--image", "{img}", "--click", "160,10,+"], "outside the 160x90 image"),
        (["--image", "{img}", "--click", "10,-1,+"], "outside"),
        (["--image", "{img}", "--click", "10,10"], "bad click"),
        (["--image", "{img}"] + ["--click", "1,1,+"] * 25, "at most 24 clicks"),
        (["--image", "{img}", "--click", "1,1,+", "--preset", "ois-huge"], "unknown preset"),
        (["--image", "{img}", "--click", "1,1,+", "--checkpoint", "{bad}"], "cannot read checkpoint"),
        (["--image", "{img}", "--click", "1,1,+", "--checkpoint", "{vits}", "--preset", "ois-tiny"], "uses tiny"),
        (["--image", "{img}", "--click", "1,1,+", "--backend", "tensorrt-nope"], "unknown backend"),
        (["--image", "{img}", "--click", "1,1,+", "--out", "{tmp}/mask.xyz"], "cannot write image"),
        (["--image", "{img}", "--click", "1,1,+", "--out", "{tmp}/no/such/dir/m.png"], "output folder does not exist"),
        (["--image", "{img}", "--click", "1,1,+", "--bogus"], "No such option"),
    ],
)
def test_predict_bad_input_is_one_line_and_exit_2(args, message, image_file, tmp_path, capsys):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG but not really")
    vits = tmp_path / "vits.pth"
    if "{vits}" in args:
        torch.save(synthetic_dav2_state_dict("vits"), vits)
    subst = {"{img}": str(image_file), "{bad}": str(bad), "{vits}": str(vits)}
    args = [subst.get(a, a).replace("{tmp}", str(tmp_path)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "mask.png")]
    if "--preset" not in args:
        args += ["--preset", "ois-tiny"]
    code, out, err = run(["predict", *args], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "mask.png").exists()  # nothing written half-way
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_lint_and_verify_commands(tiny_export, tmp_path, capsys):
    code, out, err = run(["lint", str(tiny_export)], capsys)
    assert code == 0 and out.count(": ok") == 4
    report = tmp_path / "verify.json"
    code, out, err = run(["verify", str(tiny_export), "--precision", "fp16", "--json", str(report)], capsys)
    assert code == 0, out + err
    data = json.loads(report.read_text())
    assert data["passed"] is True and data["backend"] == "ort"
    assert {r["output"] for r in data["results"]} >= {"decoder/mask_logits", "session/mask_logits", "encoder/depth"}
    assert set(data["results"][0]) >= {"precision", "output", "max_abs", "rel_l2", "nonfinite", "mask_iou_mean", "mask_iou_min"}
    assert data["machine"]["cores"] >= 1 and data["versions"]["onnxruntime"] and data["date"].startswith("20")
    assert "PASSED" in out


def test_verify_exits_1_above_tolerance(tiny_export, capsys):
    code, out, err = run(["verify", str(tiny_export), "--precision", "fp32", "--rel-l2-fp32", "1e-12", "--json", "-"], capsys)
    assert code == 1
    data = json.loads(out)  # JSON alone on stdout, the table went to stderr
    assert data["passed"] is False and data["failures"]
    assert "FAILED" in err


def test_predict_with_the_ort_backend(tiny_export, image_file, tmp_path, capsys):
    out = tmp_path / "mask.png"
    code, _, err = run(["predict", "--backend", "ort", "--model", str(tiny_export), "--precision", "fp16",
                        "--image", str(image_file), "--click", "80,45,+", "--out", str(out)], capsys)
    assert code == 0, err
    assert cv2.imread(str(out), cv2.IMREAD_UNCHANGED).shape == (90, 160)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--attention", "fused", "--opset", "18"], "needs the ONNX Attention op"),
        (["--precision", "fp8"], "precision must be"),
        (["--attention", "flash"], "attention must be matmul or fused"),
        (["--opset", "12"], "opset 12 is not supported"),
        (["--preset", "ois-nope"], "unknown preset"),
    ],
)
def test_export_bad_input(args, message, tmp_path, capsys):
    code, _, err = run(["export", "--out", str(tmp_path / "out"), *args], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_lint_and_verify_of_a_missing_folder(tmp_path, capsys):
    for command in (["lint", str(tmp_path / "none")], ["verify", str(tmp_path / "none")]):
        code, _, err = run(command, capsys)
        assert code == 2 and "export folder not found" in err


def test_benchmark_scripts_end_bad_input_like_the_cli(tmp_path):
    """A benchmark script given a missing checkpoint prints one line and exits 2, no traceback."""
    script = Path(__file__).parent.parent / "benchmarks" / "first_click_errors.py"
    missing = tmp_path / "missing.safetensors"
    done = subprocess.run([sys.executable, str(script), "--count", "1", "--checkpoint", str(missing)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error:") and "missing.safetensors" in done.stderr
    assert "Traceback" not in done.stderr
    breakdown = Path(__file__).parent.parent / "benchmarks" / "heldout_breakdown.py"
    done = subprocess.run([sys.executable, str(breakdown), str(tmp_path / "missing.jsonl")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error:") and "missing.jsonl" in done.stderr


def write_sessions(path, sessions: dict[str, list[float]]):
    path.write_text("".join(json.dumps({"name": name, "clicks": [{"x": 0, "y": 0, "positive": True, "iou": v}
                                                                 for v in ious]}) + "\n"
                            for name, ious in sessions.items()))


def test_compare_clicks_pairs_the_objects(tmp_path):
    """Differences are taken object by object (B's file in another order), counted both ways."""
    script = Path(__file__).parent.parent / "benchmarks" / "compare_clicks.py"
    a, b, out = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "cmp.json"
    write_sessions(a, {"o1": [0.5, 0.6, 0.7, 0.8, 0.91], "o2": [0.95] * 5, "o3": [0.2, 0.86, 0.9, 0.9, 0.9]})
    write_sessions(b, {"o3": [0.2, 0.86, 0.9, 0.9, 0.9], "o1": [0.7, 0.92, 0.92, 0.92, 0.92], "o2": [0.8] * 5})
    done = subprocess.run([sys.executable, str(script), str(a), str(b), "--json", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    m = json.loads(out.read_text())["metrics"]
    # NoC@90: A 5, 1, 3; B 2, 5 (never, counted as the 5 clicks there are), 3
    assert (m["NoC@90"]["a"], m["NoC@90"]["b"]) == (3.0, round(10 / 3, 4))
    assert (m["NoC@90"]["b_better"], m["NoC@90"]["a_better"], m["NoC@90"]["equal"]) == (1, 1, 1)
    assert m["IoU@1"]["b_minus_a"] == round((0.2 - 0.15) / 3, 4) and "IoU@10" not in m
    low, high = m["IoU@5"]["ci95"]
    assert low <= m["IoU@5"]["b_minus_a"] <= high and low < high
    # each model's own interval, from resampling its three objects: within their range, around the mean
    (a_low, a_high), (b_low, b_high) = m["IoU@5"]["a_ci95"], m["IoU@5"]["b_ci95"]
    assert 0.9 <= a_low < m["IoU@5"]["a"] < a_high <= 0.95 and 0.8 <= b_low < m["IoU@5"]["b"] < b_high <= 0.92
    write_sessions(b, {"o1": [0.5] * 5, "o2": [0.5] * 5})
    done = subprocess.run([sys.executable, str(script), str(a), str(b), "--json", str(tmp_path / "new.json")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error:") and "same objects" in done.stderr
    assert done.stderr.strip().count("\n") == 0 and not (tmp_path / "new.json").exists()


def load_script(name: str):
    """A benchmark script as a module (benchmarks/ is not a package)."""
    path = Path(__file__).parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_breakdown_counts_pieces_and_the_mask_grid_ceiling():
    """Pieces ignore specks; the ceiling is near 1 for a large box, 0 for a line thinner than a
    mask-grid cell (ois-tiny: 280 px input, 80x80 logits, so 3.5 input px per cell)."""
    breakdown = load_script("heldout_breakdown")
    mask = np.zeros((480, 360), bool)
    mask[40:200, 40:300] = True
    assert breakdown.pieces(mask) == 1
    mask[400, 10] = True  # one pixel: a speck
    assert breakdown.pieces(mask) == 1
    mask[300:380, 100:200] = True
    assert breakdown.pieces(mask) == 2
    box = np.zeros((480, 360), bool)
    box[40:200, 40:300] = True
    assert breakdown.grid_ceiling(box, 280, 80) > 0.97
    line = np.zeros((480, 360), bool)
    line[100:400, 180:182] = True  # 2 px wide: 1.2 px in the input frame
    assert breakdown.grid_ceiling(line, 280, 80) == 0.0
    assert breakdown.grid_ceiling(line, 280, 280) > breakdown.grid_ceiling(line, 280, 80)


PILOT = Path(__file__).parent.parent / "benchmarks" / "pilot_train.py"


@pytest.mark.parametrize("override", [("--set", "decoder.no_such_field=1"), ("--set", "input_size=281"),
                                      ("--set", "decoder.width=[64"), ("--train", "no_such_setting=1"),
                                      ("--train", "steps=5"), ("--train", "objects_per_scene=\"6\""),
                                      ("--clicks", "0")])
def test_pilot_script_rejects_a_bad_override_before_training(tmp_path, override):
    done = subprocess.run([sys.executable, str(PILOT), "bad", "--steps", "1", *override],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("error:") and done.stderr.strip().count("\n") == 0
    assert not (tmp_path / "artifacts").exists()


def test_pilot_script_trains_the_changed_preset_and_scores_it(tmp_path, capsys):
    """The override reaches the trained checkpoint's config, and the score covers the asked objects and clicks."""
    assert run(["scenes", "--out", str(tmp_path / "heldout"), "--count", "1", "--seed", "0"], capsys)[0] == 0
    done = subprocess.run([sys.executable, str(PILOT), "p", "--steps", "1", "--set", "decoder.token_skip=false",
                           "--train", "objects_per_scene=2", "--train", "lr=1",
                           "--dataset", "heldout", "--objects", "1", "--clicks", "2"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "artifacts" / "pilots" / "p.eval.json").read_text())
    assert report["objects"] == 1 and len(report["mIoU@k"]) == 2 and report["steps"] == 1
    model, _ = load_model(None, str(tmp_path / "artifacts" / "pilots" / "p.safetensors"))
    assert not model.cfg.decoder.token_skip and get_preset("ois-tiny").decoder.token_skip
    with safe_open(str(tmp_path / "artifacts" / "pilots" / "p.safetensors"), framework="pt") as f:
        settings = json.loads(f.metadata()["training"])["settings"]
    assert settings["objects_per_scene"] == 2 and settings["lr"] == 1.0 and settings["batch_size"] == 4


TRAIN_SPEED = Path(__file__).parent.parent / "benchmarks" / "train_speed.py"


@pytest.mark.slow
def test_train_speed_times_the_tree_against_a_revision(tmp_path):
    """Both trees really train (each run checks it imported its own tree's code) and the ratio
    is of the two means; the temporary worktree is gone afterwards."""
    out = tmp_path / "speed.json"
    worktrees = lambda: subprocess.run(["git", "-C", str(TRAIN_SPEED.parent), "worktree", "list"],  # noqa: E731
                                       capture_output=True, text=True).stdout
    before = worktrees()
    done = subprocess.run([sys.executable, str(TRAIN_SPEED), "--base", "HEAD", "--steps", "1", "--rounds", "1",
                           "--json", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    current, base = report["current"]["seconds_per_step"], report["base"]["seconds_per_step"]
    assert current > 0 and base > 0 and report["ratio_current_to_base"] == round(current / base, 3)
    assert len(report["runs_seconds"]["base"]) == 1 and report["machine"]["cores"] and report["date"]
    assert worktrees() == before


def test_train_speed_refuses_an_unknown_revision(tmp_path):
    done = subprocess.run([sys.executable, str(TRAIN_SPEED), "--base", "no-such-revision", "--json", str(tmp_path / "s.json")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error:") and "no-such-revision" in done.stderr
    assert done.stderr.strip().count("\n") == 0 and not (tmp_path / "s.json").exists()


RETRAIN_CHECK = Path(__file__).parent.parent / "benchmarks" / "retrain_check.py"


def retrain_check(reference, rerun, out):
    return subprocess.run([sys.executable, str(RETRAIN_CHECK), "--reference", f"{reference}.safetensors",
                           "--reference-log", f"{reference}.jsonl", "--rerun", f"{rerun}.safetensors",
                           "--rerun-log", f"{rerun}.jsonl", "--json", str(out)], capture_output=True, text=True)


def test_retrain_check_tells_a_reproduced_training_from_another_seed(tmp_path, capsys):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        argv = ["train", "--preset", "ois-tiny", "--steps", "2", "--seed", str(seed),
                "--out", str(tmp_path / f"{name}.safetensors"), "--log", str(tmp_path / f"{name}.jsonl")]
        assert run(argv, capsys)[0] == 0
    same = retrain_check(tmp_path / "a", tmp_path / "b", tmp_path / "same.json")
    assert same.returncode == 0, same.stderr
    report = json.loads((tmp_path / "same.json").read_text())
    assert report["reproduced"] and report["log"]["records"] == [2, 2] and report["weights"]["tensors"] > 100
    assert all(s > 0 for s in report["training_seconds"].values())
    other = retrain_check(tmp_path / "a", tmp_path / "c", tmp_path / "other.json")
    assert other.returncode == 1, other.stderr
    report = json.loads((tmp_path / "other.json").read_text())
    assert not report["reproduced"] and report["log"]["first_differing_record"] == 0
    assert report["weights"]["differing"] and report["weights"]["max_abs_difference"] > 0


def test_retrain_check_rejects_a_missing_log_and_a_foreign_file(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"not a checkpoint")
    (tmp_path / "a.jsonl").write_text("{}\n")
    done = retrain_check(tmp_path / "a", tmp_path / "a", tmp_path / "r.json")
    assert done.returncode == 2 and done.stderr.startswith("error:") and done.stderr.strip().count("\n") == 0
    save_checkpoint(OIS(get_preset("ois-tiny")), tmp_path / "b.safetensors")  # no log beside it
    done = retrain_check(tmp_path / "b", tmp_path / "b", tmp_path / "r.json")
    assert done.returncode == 2 and "loss log not found" in done.stderr and done.stderr.strip().count("\n") == 0
    for log in ("[1, 2]\n", "not json\n"):  # JSON that is not a record, and no JSON at all
        (tmp_path / "b.jsonl").write_text(log)
        done = retrain_check(tmp_path / "b", tmp_path / "b", tmp_path / "r.json")
        assert done.returncode == 2 and "loss log" in done.stderr and done.stderr.strip().count("\n") == 0
    (tmp_path / "b.jsonl").unlink()
    (tmp_path / "b.jsonl").mkdir()  # a folder where the log should be
    done = retrain_check(tmp_path / "b", tmp_path / "b", tmp_path / "r.json")
    assert done.returncode == 2 and "cannot read loss log" in done.stderr and done.stderr.strip().count("\n") == 0
    assert not (tmp_path / "r.json").exists()
