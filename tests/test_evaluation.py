"""Click simulator, metrics, dataset layouts, and eval/bench runs of ois-tiny."""

import json

import cv2
import numpy as np
import pytest
from conftest import run_cli as run

from ois_deploy.evaluate.datasets import load_dataset
from ois_deploy.errors import UserError
from ois_deploy.evaluate.clicker import Clicker
from ois_deploy.evaluate.metrics import ObjectResult, noc, read_clicks, summarise
from ois_deploy.train.scenes import make_scene


def result(ious, name="o"):
    r = ObjectResult(name, ious=list(ious))
    r.decode_seconds = [0.01] * len(ious)
    r.encode_seconds = 0.1
    return r


def test_metric_arithmetic_by_hand():
    a = result([0.5, 0.86, 0.91, 0.96] + [0.96] * 16)  # NoC@85=2, @90=3, @95=4
    b = result([0.2] * 19 + [0.92])  # reaches 0.90 at the last click: NoC 20, counted as a failure
    c = result([0.88] * 20)  # 85 at 1, never 90 or 95
    s = summarise([a, b, c], max_clicks=20)
    assert s["NoC@85"] == pytest.approx((2 + 20 + 1) / 3)
    assert s["NoC@90"] == pytest.approx((3 + 20 + 20) / 3)
    assert s["NoC@95"] == pytest.approx((4 + 20 + 20) / 3)
    assert (s["NoF@85"], s["NoF@90"], s["NoF@95"]) == (1, 2, 2)
    assert len(s["mIoU@k"]) == 20
    assert s["mIoU@k"][0] == pytest.approx((0.5 + 0.2 + 0.88) / 3)
    assert s["mIoU@k"][19] == pytest.approx((0.96 + 0.92 + 0.88) / 3)
    # SPC: (3 x 0.1 s encoder + 60 x 10 ms) / 60 clicks
    assert s["spc_ms"] == pytest.approx((0.3 + 0.6) / 60 * 1000)
    assert noc([0.9], 0.9, 20) == 1 and noc([], 0.9, 20) == 20


def test_first_click_is_the_interior_most_point():
    gt = np.zeros((40, 60), bool)
    gt[10:31, 15:36] = True  # a 21 x 21 square: its centre (25, 20) is the unique deepest point
    click = Clicker(gt).next_click(np.zeros_like(gt))
    assert click.positive and (click.x, click.y) == (25, 20)


def test_image_border_counts_as_outside():
    gt = np.zeros((20, 20), bool)
    gt[:, :10] = True  # touches the border: the deepest point is 5 px from it, not at column 0
    click = Clicker(gt).next_click(np.zeros_like(gt))
    assert 4 <= click.x <= 5


def test_false_negative_against_false_positive():
    gt = np.zeros((50, 50), bool)
    gt[5:25, 5:25] = True
    pred = gt.copy()
    pred[30:48, 30:48] = True  # a big false positive, no false negative
    click = Clicker(gt).next_click(pred)
    assert not click.positive and 30 <= click.x < 48 and 30 <= click.y < 48
    pred2 = np.zeros_like(gt)
    pred2[5:25, 5:15] = True  # half the object missed, small FP
    pred2[40:43, 40:43] = True
    click = Clicker(gt).next_click(pred2)
    assert click.positive and 15 <= click.x < 25


def test_clicked_pixels_are_excluded():
    gt = np.zeros((30, 30), bool)
    gt[10:19, 10:19] = True
    clicker = Clicker(gt)
    empty = np.zeros_like(gt)
    first, second = clicker.next_click(empty), clicker.next_click(empty)
    assert (first.x, first.y) == (14, 14)
    assert (second.x, second.y) != (14, 14) and gt[second.y, second.x]


def make_davis(folder, count=3, size=(96, 128)):
    (folder / "img").mkdir(parents=True)
    (folder / "gt").mkdir()
    for i in range(count):
        scene = make_scene(100 + i, *size)
        obj = max(scene.masks, key=lambda m: m.sum())
        cv2.imwrite(str(folder / "img" / f"obj{i}.jpg"), cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(folder / "gt" / f"obj{i}.png"), obj.astype(np.uint8) * 255)
    return folder


def test_dataset_layouts(tmp_path):
    layout, samples = load_dataset(make_davis(tmp_path / "davis", 2))
    assert layout == "davis" and [s.name for s in samples] == ["obj0", "obj1"]
    image, mask = samples[0].load()
    assert image.shape[:2] == mask.shape and mask.dtype == bool and mask.any()

    hq = tmp_path / "hq" / "thin_object_detection" / "HRSOD"
    (hq / "images").mkdir(parents=True)
    (hq / "masks_max255").mkdir()
    cv2.imwrite(str(hq / "images" / "a.jpg"), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(hq / "masks_max255" / "a.png"), np.full((8, 8), 255, np.uint8))
    layout, samples = load_dataset(tmp_path / "hq")
    assert layout == "hqseg44k-val" and [s.name for s in samples] == ["HRSOD/a"]
    assert load_dataset(hq)[0] == "hrsod"


def test_dataset_errors(tmp_path):
    folder = make_davis(tmp_path / "d", 2)
    (folder / "gt" / "obj1.png").unlink()
    (folder / "gt" / "stray.png").write_bytes(b"")
    with pytest.raises(UserError, match="2 files without a partner.*obj1.jpg.*stray.png"):
        load_dataset(folder)
    with pytest.raises(UserError, match="not a dataset folder"):
        load_dataset(tmp_path)
    with pytest.raises(UserError, match="dataset folder not found"):
        load_dataset(tmp_path / "nope")


def test_eval_on_a_generated_davis_dataset(tmp_path, capsys):
    data = make_davis(tmp_path / "davis", 3)
    report, clicks, plot = tmp_path / "eval.json", tmp_path / "clicks.jsonl", tmp_path / "curve.png"
    code, out, err = run(["eval", "ois-tiny", "--dataset", str(data), "--max-clicks", "5", "--json", str(report),
                          "--save-clicks", str(clicks), "--plot", str(plot)], capsys)
    assert code == 0, err
    data_json = json.loads(report.read_text())
    s = data_json["summary"]
    assert set(s) >= {"NoC@85", "NoC@90", "NoC@95", "NoF@85", "NoF@90", "NoF@95", "mIoU@k", "spc_ms"}
    assert len(s["mIoU@k"]) == 5 and all(0 <= v <= 1 for v in s["mIoU@k"])
    assert 1 <= s["NoC@90"] <= 5 and data_json["objects"] == 3 and data_json["backend"] == "torch"
    lines = [json.loads(line) for line in clicks.read_text().splitlines()]
    assert [line["name"] for line in lines] == ["obj0", "obj1", "obj2"]
    first = lines[0]["clicks"][0]
    assert first["positive"] is True and 0 <= first["x"] < 128 and 0 <= first["y"] < 96
    assert len(lines[0]["clicks"]) == 5
    assert cv2.imread(str(plot)) is not None
    # The saved sessions give back the report's figures (IoUs are rounded to 6 places in the file).
    again = summarise(read_clicks(clicks), max_clicks=5)
    assert again["NoC@90"] == s["NoC@90"] and again["mIoU@k"] == pytest.approx(s["mIoU@k"], abs=1e-6)


def test_clicks_file_errors(tmp_path):
    good = json.dumps({"name": "o", "clicks": [{"x": 1, "y": 2, "positive": True, "iou": 0.5}]})
    cases = {"missing.jsonl": None, "empty.jsonl": "", "corrupt.jsonl": good + "\n{not json\n",
             "no-iou.jsonl": '{"name": "o", "clicks": [{"x": 1, "y": 2, "positive": true}]}\n'}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(UserError) as info:
            read_clicks(tmp_path / name)
        assert name in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "good.jsonl").write_text(good + "\n")
    [back] = read_clicks(tmp_path / "good.jsonl")
    assert back.ious == [0.5] and (back.clicks[0].x, back.clicks[0].y, back.clicks[0].positive) == (1, 2, True)


def test_eval_task_parity_ort_against_torch(tiny_export, tmp_path, capsys):
    data = make_davis(tmp_path / "davis", 2)
    code, out, err = run(["eval", str(tiny_export), "--backend", "ort", "--compare-backend", "torch",
                          "--dataset", str(data), "--max-clicks", "4", "--json", "-"], capsys)
    assert code == 0, err
    compare = json.loads(out)["compare"]
    assert compare["precision"] == "fp32"  # the reference, whatever the backend under test runs
    assert compare["identical_click_sequences"] == compare["objects"] == 2
    assert compare["max_iou_difference"] < 1e-3
    assert set(compare["NoC@90"]) == {"ort fp32", "torch fp32"}
    assert compare["summary"]["mIoU@k"] == pytest.approx(json.loads(out)["summary"]["mIoU@k"], abs=1e-3)


def test_bench_writes_the_documented_fields(tmp_path, capsys):
    code, out, err = run(["bench", "ois-tiny", "--repeats", "2", "--clicks", "3", "--sat-chunk", "64",
                          "--results-dir", str(tmp_path), "--json", "-"], capsys)
    assert code == 0, err
    record = json.loads(out)
    assert set(record) >= {"backend", "precision", "preset", "device", "versions", "encoder_ms", "decoder_ms",
                           "spc_ms", "sat_batched_ms", "sat_sequential_ms"}
    assert record["backend"] == "torch" and record["preset"] == "ois-tiny"
    assert 0 < record["decoder_ms"]["p50"] <= record["decoder_ms"]["p90"]
    assert record["encoder_ms"] > 0 and record["sat_sequential_ms"] > 0
    saved = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert saved[-1]["spc_ms"] == record["spc_ms"]
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- bench-report:start -->\nold\n<!-- bench-report:end -->\ntail\n")
    code, out, err = run(["bench", "--report", "--results-dir", str(tmp_path), "--readme", str(readme)], capsys)
    assert code == 0 and "| `ois-tiny` | torch | fp32 |" in out
    assert (tmp_path / "report.png").is_file()
    text = readme.read_text()
    assert "old" not in text and "| `ois-tiny` | torch | fp32 |" in text and text.endswith("tail\n")


def test_eval_and_bench_bad_input(tmp_path, capsys):
    for argv, message in [
        (["eval", "ois-tiny", "--dataset", str(tmp_path / "none")], "dataset folder not found"),
        (["eval", "ois-tiny", "--backend", "ort", "--dataset", str(make_davis(tmp_path / "d", 1))], "needs an export folder"),
        (["bench", "ois-tiny", "--backend", "torch-cuda"], "needs a CUDA GPU"),
        (["bench", "ois-tiny", "--backend", "trt"], "backend trt needs an export folder"),
        (["bench", "--report", "--results-dir", str(tmp_path / "empty")], "no benchmark results"),
        (["eval", "ois-tiny", "--order-attention", "sideways", "--dataset", str(tmp_path / "d")], "order_attention must be one of"),
    ]:
        code, _, err = run(argv, capsys)
        assert code == 2 and message in err, err
