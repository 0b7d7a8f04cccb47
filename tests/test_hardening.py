"""Issue 24: every bad input refused with one line (exit code 2) before anything is written;
export folders written whole; manifests, checkpoint configs, values and images validated."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import run_cli as run
import torch
from PIL import Image

from ois_deploy import Predictor, UserError
from ois_deploy.contract import check_graph, read_manifest
from ois_deploy.export.lint import lint_export
from ois_deploy.io import staged_folder
from ois_deploy.model import get_preset
from ois_deploy.model.weights import FORMAT_TAG, load_model, save_checkpoint
from ois_deploy.provenance import sha256_file

# Capabilities that let root write anywhere: dropped, root obeys file permissions (util-linux's
# setpriv). Other users obey them anyway.
SETPRIV = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--inh-caps=-all", "--"]
DROP_CAPS = SETPRIV if os.geteuid() == 0 else []


def cli(args, cwd=None, drop_caps=False, timeout=600):
    """The real entry point in a subprocess (for dropped capabilities and signals)."""
    command = [*(DROP_CAPS if drop_caps else []), sys.executable, "-m", "ois_deploy", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=timeout)


def one_error(code, err, *words):
    """Exit code 2, exactly one `error:` line, no traceback; the line holds all of `words`."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def old_folder(tmp_path: Path) -> Path:
    """tmp_path/out holding old.txt: a folder that a staged write may replace."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    return target


def listing(root: Path) -> list[str]:
    """Every file and folder under root, hidden ones too."""
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "img.png"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 256, (90, 160, 3), dtype=np.uint8))
    return path


@pytest.fixture
def readonly(tmp_path):
    """A folder that only root with its capabilities may write in."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


@pytest.fixture
def export_copy(tiny_export, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_export, dst)
    return dst


def edit_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_setpriv_drops_the_right_to_write_anywhere(readonly):
    done = subprocess.run([*DROP_CAPS, "touch", str(readonly / "x")], capture_output=True)
    assert done.returncode != 0 and not (readonly / "x").exists()


# --- 1. Output paths: checked before any work, nothing written ---

def test_predict_into_an_unwritable_folder(image_file, readonly, tmp_path):
    before = listing(tmp_path)
    done = cli(["predict", "-i", image_file, "--click", "80,45,+", "-o", readonly / "mask.png"], drop_caps=True)
    one_error(done.returncode, done.stderr, "cannot write in", "permission denied")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("case", ["overlay folder missing", "out empty", "out is the image", "out is a folder",
                                  "same out and overlay", "bad overlay suffix"])
def test_predict_outputs_are_checked_first(case, image_file, tmp_path, capsys):
    mask = tmp_path / "mask.png"
    args = {
        "overlay folder missing": ["-o", mask, "--overlay", tmp_path / "missing" / "o.png"],
        "out empty": ["-o", ""],
        "out is the image": ["-o", image_file],
        "out is a folder": ["-o", tmp_path],
        "same out and overlay": ["-o", mask, "--overlay", mask],
        "bad overlay suffix": ["-o", mask, "--overlay", tmp_path / "o.txt"],
    }[case]
    before, image_bytes = listing(tmp_path), image_file.read_bytes()
    code, _, err = run(["predict", "-i", str(image_file), "--click", "80,45,+", *map(str, args)], capsys)
    one_error(code, err)
    assert listing(tmp_path) == before and image_file.read_bytes() == image_bytes


@pytest.fixture
def dataset(tmp_path):
    """A generic dataset: two objects, the second with an empty ground truth."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for name, filled in (("a", True), ("b", False)):
        cv2.imwrite(str(root / "images" / f"{name}.png"), rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
        mask = np.zeros((60, 80), np.uint8)
        if filled:
            mask[15:45, 20:60] = 255
        cv2.imwrite(str(root / "masks" / f"{name}.png"), mask)
    return root


def test_eval_json_into_a_folder_fails_before_the_run(dataset, tmp_path, capsys):
    before = listing(tmp_path)
    code, _, err = run(["eval", "ois-tiny", "-d", str(dataset), "--max-clicks", "2", "--json", str(tmp_path),
                        "--save-clicks", str(tmp_path / "clicks.jsonl"), "--plot", str(tmp_path / "curve.png")], capsys)
    one_error(code, err, "is a folder")
    assert listing(tmp_path) == before


def test_eval_plot_into_an_unwritable_folder(dataset, readonly, tmp_path):
    before = listing(tmp_path)
    done = cli(["eval", "ois-tiny", "-d", dataset, "--max-clicks", "2", "--save-clicks", tmp_path / "clicks.jsonl",
                "--plot", readonly / "curve.png"], drop_caps=True)
    one_error(done.returncode, done.stderr, "--plot", "permission denied")
    assert listing(tmp_path) == before


def test_eval_skips_an_empty_ground_truth_and_counts_it(dataset, tmp_path, capsys):
    code, out, err = run(["eval", "ois-tiny", "-d", str(dataset), "--max-clicks", "2", "--json", "-"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["objects"] == 1 and report["skipped_empty_gt"] == 1
    skipped = [line for line in err.splitlines() if "empty ground-truth" in line]
    assert len(skipped) == 1 and skipped[0].startswith("skipped 1 object") and skipped[0].endswith(": b")


def test_bench_outputs(tmp_path, image_file, capsys):
    before = listing(tmp_path)
    afile = tmp_path / "a-file"
    afile.write_text("x")
    before = listing(tmp_path)
    for args, words in ((["--results-dir", str(afile)], ("not a folder",)),
                        (["--results-dir", str(tmp_path / "no" / "such")], ("does not exist",)),
                        (["--json", str(tmp_path)], ("is a folder",)),
                        (["--image", str(image_file), "--json", str(image_file)], ("also an input",))):
        code, _, err = run(["bench", "ois-tiny", "--clicks", "1", "--repeats", "1", "--no-sat", *args], capsys)
        one_error(code, err, *words)
        assert listing(tmp_path) == before


def test_bench_results_dir_is_made_when_creatable(tmp_path, capsys):
    results = tmp_path / "results"
    code, _, err = run(["bench", "ois-tiny", "--clicks", "1", "--repeats", "1", "--no-sat",
                        "--results-dir", str(results)], capsys)
    assert code == 0, err
    assert listing(results) == ["bench.jsonl"] and len((results / "bench.jsonl").read_text().splitlines()) == 1


def test_json_outputs_of_info_verify_and_train(tiny_export, tmp_path, capsys):
    before = listing(tmp_path)
    for argv in (["info", "--json", str(tmp_path)],
                 ["verify", str(tiny_export), "--json", str(tmp_path / "missing" / "v.json")],
                 ["verify", str(tiny_export), "--json", str(tiny_export / "manifest.json")],  # inside the input
                 ["train", "--out", "", "--steps", "1"],
                 ["train", "--out", str(tmp_path / "missing" / "c.safetensors"), "--steps", "1"],
                 ["train", "--out", str(tmp_path / "c.safetensors"), "--log", str(tmp_path / "c.safetensors"), "--steps", "1"]):
        code, _, err = run(argv, capsys)
        one_error(code, err)
        assert listing(tmp_path) == before


@pytest.mark.parametrize("case", ["empty", "unwritable", "other files", "a file"])
def test_export_out_is_checked_first(case, tmp_path, readonly):
    target = {"empty": "", "unwritable": readonly / "x", "other files": tmp_path / "mine", "a file": tmp_path / "f"}[case]
    if case == "other files":
        target.mkdir()
        (target / "notes.txt").write_text("keep me")
    if case == "a file":
        target.write_text("keep me")
    work = tmp_path / "cwd"
    work.mkdir()
    before = listing(tmp_path)
    done = cli(["export", "--out", target, "--precision", "fp32"], cwd=work, drop_caps=case == "unwritable", timeout=120)
    one_error(done.returncode, done.stderr)
    assert listing(tmp_path) == before
    assert "weights:" not in done.stderr  # refused before the model was loaded


# --- 1. Export folders: staged, swapped in whole, locked ---

def wait_for(predicate, timeout=300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("timed out")


def staged_graph(parent: Path, name: str):
    """A graph file already written in the staging folder of export NAME (not the old export that
    the final renames put aside: seen there, the export has already finished)."""
    staging = [d for d in parent.glob(f".{name}.*") if d.is_dir() and not d.name.startswith(f".{name}.old.")]
    return next((p for d in staging for p in d.glob("*.onnx")), None)


def assert_complete_export(folder: Path, hashes: dict | None = None):
    manifest = read_manifest(folder)
    for name in manifest["graphs"]:
        check_graph(folder / name, manifest)
    assert all(r.ok for r in lint_export(folder))
    if hashes is not None:
        assert {name: sha256_file(folder / name) for name in manifest["graphs"]} == hashes
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")], "leftovers"


@pytest.mark.parametrize("signum,old_export", [(signal.SIGINT, True), (signal.SIGTERM, False)])
def test_an_interrupted_export_leaves_the_old_folder_or_none(signum, old_export, export_copy):
    """The signal comes while graphs are being written (one is already in the staging folder)."""
    target = export_copy if old_export else export_copy.parent / "new"
    old = {name: sha256_file(export_copy / name) for name in read_manifest(export_copy)["graphs"]}
    before = listing(target.parent)
    # Ctrl-C as in a terminal, whatever the test runner was started with (a background job ignores SIGINT)
    process = subprocess.Popen([sys.executable, "-m", "ois_deploy", "export", "--out", str(target)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(lambda: staged_graph(target.parent, target.name) or process.poll() is not None)
        assert process.poll() is None, process.stderr.read()
        process.send_signal(signum)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode != 0 and "Traceback" not in err, err
    assert listing(target.parent) == before  # no staging folder, no lock file, no new target
    if old_export:
        assert_complete_export(export_copy, old)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_swallowed_by_a_library_still_leaves_the_old_folder(signum, tmp_path):
    """A KeyboardInterrupt caught by a bare except inside the writer (as an exporter's library may
    do) does not let the folder be replaced: the signal is remembered and raised again."""
    target = old_folder(tmp_path)
    # as in a terminal, whatever the test runner was started with (a background job ignores SIGINT)
    outer = signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    try:
        handler = signal.getsignal(signum)
        with pytest.raises(KeyboardInterrupt):
            with staged_folder(target) as staging:
                (staging / "new.txt").write_text("new")
                try:
                    os.kill(os.getpid(), signum)
                    time.sleep(1)  # the handler raises here
                except KeyboardInterrupt:
                    pass  # swallowed
        assert signal.getsignal(signum) is handler  # put back
    finally:
        signal.signal(signum, outer)
    assert listing(tmp_path) == ["out", "out/old.txt"]  # no staging folder, no lock file


def test_export_replaces_an_old_folder_whole_and_refuses_a_second_export(export_copy, tmp_path):
    # An old export made from other (random) weights, so that its replacement shows.
    edit_manifest(export_copy, lambda m: m.update(note="old"))
    process = subprocess.Popen([sys.executable, "-m", "ois_deploy", "export", "--out", str(export_copy),
                                "--precision", "fp32", "--checkpoint", "random"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        staging = lambda: [d for d in export_copy.parent.glob(f".{export_copy.name}.*") if d.is_dir()]  # noqa: E731
        wait_for(lambda: staging() or process.poll() is not None)  # the lock is held from before this
        second = cli(["export", "--out", export_copy, "--precision", "fp32"], timeout=120)
        one_error(second.returncode, second.stderr, "another process is writing")
        _, err = process.communicate(timeout=600)
    finally:
        process.kill()
    assert process.returncode == 0, err
    manifest = read_manifest(export_copy)
    assert "note" not in manifest and manifest["precisions"] == ["fp32"] and manifest["weights"]["format"] == "random"
    assert sorted(p.name for p in export_copy.iterdir()) == ["decoder.onnx", "encoder.onnx", "manifest.json"]
    assert_complete_export(export_copy)
    # verify --checkpoint of this random-weights export is no longer ignored
    bundled = Path(__file__).parents[1] / "ois_deploy" / "assets" / "ois-tiny.safetensors"
    done = cli(["verify", export_copy, "--checkpoint", bundled], timeout=300)
    one_error(done.returncode, done.stderr, "its weights differ")


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from ois_deploy import io
target = Path(sys.argv[1])
if sys.argv[2] == "between-renames":  # the old folder renamed aside, the new one not yet in
    io.shutil.rmtree = lambda *a, **k: None
    io.os.rename = lambda a, b, rename=os.rename: (rename(a, b), Path(b).name.startswith(".") and os.kill(os.getpid(), signal.SIGKILL))
with io.staged_folder(target) as staging:
    (staging / "half.onnx").write_bytes(b"half")
    if sys.argv[2] == "writing":
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("when", ["writing", "between-renames"])
def test_a_killed_writer_leaves_nothing_after_the_next_export(when, tmp_path):
    """SIGKILL cannot be caught: the staging folder (or the old folder renamed aside) stays. The
    next write into the same place removes it, and puts an old folder aside back first (seen
    here through a next write that fails: the old folder is what is left)."""
    target = old_folder(tmp_path)
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target), when], capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [p for p in listing(tmp_path) if p.startswith(".out.") and "/" not in p]  # left behind
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(target) as staging:
            (staging / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert listing(tmp_path) == ["out", "out/old.txt"]


def test_staged_folder_keeps_the_old_folder_on_an_error(tmp_path):
    target = old_folder(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(target) as staging:
            (staging / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert listing(tmp_path) == ["out", "out/old.txt"]
    refused = []

    def second_writer():
        try:
            with staged_folder(target):
                pass
        except UserError as e:
            refused.append(str(e))

    with staged_folder(target) as staging:
        (staging / "new.txt").write_text("new")
        writer = threading.Thread(target=second_writer)  # a thread of this process is refused too
        writer.start()
        writer.join()
    assert len(refused) == 1 and "another process is writing" in refused[0]
    assert listing(tmp_path) == ["out", "out/new.txt"]


# --- 2. Schemas: manifests and checkpoint configs ---

@pytest.mark.parametrize("change,words", [
    (lambda m: m.pop("config"), ("config: missing",)),
    (lambda m: m.pop("graphs"), ("graphs: missing",)),
    (lambda m: m.pop("precisions"), ("precisions: missing",)),
    (lambda m: m.update(precisions="fp32"), ("precisions: expected a list",)),
    (lambda m: m.update(input_size=322), ("input_size: 322 but config says 280",)),
    (lambda m: m["config"]["encoder"].update(num_heads=3), ("encoder.num_heads: 3 does not divide",)),
    (lambda m: m["graphs"].pop("decoder.fp16.onnx"), ("no decoder graph decoder.fp16.onnx",)),
])
def test_a_broken_manifest_is_refused_by_every_command(change, words, export_copy, image_file, tmp_path, capsys):
    edit_manifest(export_copy, change)
    for argv in (["lint", str(export_copy)], ["verify", str(export_copy)],
                 ["predict", "-m", str(export_copy), "-i", str(image_file), "--click", "80,45,+", "-o", str(tmp_path / "m.png")],
                 ["bench", str(export_copy), "--clicks", "1", "--repeats", "1", "--no-sat"]):
        code, _, err = run(argv, capsys)
        one_error(code, err, "manifest", *words)
    assert not (tmp_path / "m.png").exists()


def test_a_manifest_that_disagrees_with_its_graphs_is_refused(export_copy, image_file, tmp_path, capsys):
    """input_size edited consistently in the manifest (and its config): the graphs say otherwise."""
    def change(m):
        m["input_size"] = m["config"]["input_size"] = 322
        m["mask_size"] = 4 * 322 // 14
    edit_manifest(export_copy, change)
    code, _, err = run(["predict", "-m", str(export_copy), "-i", str(image_file), "--click", "80,45,+",
                        "-o", str(tmp_path / "m.png")], capsys)
    one_error(code, err, "ois.input_size='280'", "322")
    code, out, err = run(["lint", str(export_copy)], capsys)
    one_error(code, err, "failed lint")
    assert "ois.input_size='280'" in out


def test_lint_checks_hashes_and_weights_against_the_manifest(export_copy, capsys):
    edit_manifest(export_copy, lambda m: m["graphs"]["encoder.onnx"].update(sha256="0" * 64))
    code, out, err = run(["lint", str(export_copy)], capsys)
    one_error(code, err, "failed lint")
    assert "sha256 differs from manifest.json" in out
    edit_manifest(export_copy, lambda m: m.update(model_hash="f" * 16))
    code, out, err = run(["lint", str(export_copy)], capsys)
    one_error(code, err, "failed lint")
    assert out.count("ois.model_hash=") == 4  # every graph


def test_lint_checks_the_preset_of_each_graph_against_the_manifest(export_copy, capsys):
    import onnx

    path = export_copy / "decoder.fp16.onnx"
    graph = onnx.load(str(path))
    for prop in graph.metadata_props:
        if prop.key == "ois.preset":
            prop.value = "ois-s-1024"
    onnx.save(graph, str(path))
    edit_manifest(export_copy, lambda m: m["graphs"]["decoder.fp16.onnx"].update(sha256=sha256_file(path)))
    code, out, err = run(["lint", str(export_copy)], capsys)
    one_error(code, err, "failed lint")
    assert "decoder.fp16.onnx has ois.preset='ois-s-1024' but the manifest says 'ois-tiny'" in out
    assert out.count(": ok") == 3


def config_checkpoint(path: Path, change, state=None) -> Path:
    """An ois-deploy safetensors file whose config is ois-tiny's with `change` applied."""
    from safetensors.torch import save_file

    config = get_preset("ois-tiny").to_dict()
    change(config)
    save_file(state or {"x": torch.zeros(1)}, str(path), metadata={"format": FORMAT_TAG, "ois_config": json.dumps(config)})
    return path


@pytest.mark.parametrize("change,words", [
    (lambda c: c["encoder"].update(num_heads=3), ("encoder.num_heads: 3 does not divide encoder.embed_dim 128",)),
    (lambda c: c["encoder"].update(embed_dim=-128), ("encoder.embed_dim: -128 is below the minimum 1",)),
    (lambda c: c["encoder"].update(embed_dim=16384, depth=64), ("encoder.embed_dim: 16384 is above the maximum 4096",)),
    (lambda c: c["encoder"].update(embed_dim=4096, depth=64, num_heads=32), ("parameters, over the limit",)),
    (lambda c: c["decoder"].update(num_heads=5), ("decoder.num_heads: 5 does not divide decoder.width 64",)),
    (lambda c: c.update(input_size=281), ("input_size: 281 is not a multiple",)),
    (lambda c: c.pop("encoder"), ("encoder: missing",)),
    (lambda c: c["encoder"].update(depth="4"), ("encoder.depth: expected an integer",)),
    (lambda c: c["decoder"].update(wdith=64), ("decoder.wdith: unknown field",)),
])
def test_a_bad_checkpoint_config_is_refused_before_building(change, words, tmp_path, capsys):
    path = config_checkpoint(tmp_path / "c.safetensors", change)
    code, _, err = run(["info", "--checkpoint", str(path)], capsys)
    one_error(code, err, "invalid model config in checkpoint", *words)


# --- 3. Values ---

@pytest.mark.parametrize("bad,words", [
    (lambda t: t.fill_(float("nan")), ("NaN or infinite values in: decoder.",)),
    (lambda t: t.fill_(float("inf")), ("NaN or infinite",)),
    (lambda t: t.long(), ("not floating point", "(int64)")),
    (lambda t: t.bool(), ("not floating point", "(bool)")),
])
def test_checkpoint_values_must_be_finite_floats(bad, words, tiny, tmp_path, image_file, capsys):
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    key = next(k for k in state if k.startswith("decoder."))
    state[key] = bad(state[key])
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path), metadata={"format": FORMAT_TAG, "ois_config": json.dumps(tiny.cfg.to_dict())})
    code, _, err = run(["predict", "-i", str(image_file), "--click", "80,45,+", "-c", str(path),
                        "-o", str(tmp_path / "m.png")], capsys)
    one_error(code, err, key, *words)
    assert not (tmp_path / "m.png").exists()


def test_predictor_validates_its_inputs():
    predictor = Predictor.open("ois-tiny", max_image_pixels=10_000)
    with pytest.raises(UserError, match="at least 1x1"):
        predictor.set_image(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(UserError, match="over the limit of 10,000"):
        predictor.set_image(np.zeros((101, 100, 3), np.uint8))
    predictor.set_image(np.zeros((60, 80, 3), np.uint8))
    for prev in (np.full((60, 80), np.nan, np.float32), np.full((60, 80), np.inf, np.float32),
                 np.full((60, 80), 255, np.uint8), np.full((60, 80), 1.5, np.float32)):
        with pytest.raises(UserError, match="finite float probability"):
            predictor.predict([(10, 10, True)], prev)
    assert predictor.predict([(10, 10, True)], np.full((60, 80), 0.5, np.float32)).mask.shape == (60, 80)


# --- 4. Images ---

def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height (its data is a stub): only the header is to be read."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_a_jpeg_with_a_trailer_is_read_and_other_formats_are_named(tmp_path, capsys):
    """Data after a JPEG's end marker (a phone's motion-photo video) is not truncation: predict
    reads the image before it, as without the trailer. A truncated JPEG is still refused, and a
    format that is not read is named (not "corrupt")."""
    ok, jpeg = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 256, (90, 160, 3), dtype=np.uint8))
    plain, trailed = tmp_path / "plain.jpg", tmp_path / "motion.jpg"
    plain.write_bytes(jpeg.tobytes())
    trailed.write_bytes(jpeg.tobytes() + b"\x00\x00\x00\x18ftypmp42" + bytes(5000))
    for image in (plain, trailed):
        code, _, err = run(["predict", "-i", str(image), "--click", "80,45,+", "-o", str(tmp_path / f"{image.stem}.png"),
                            "--backend", "torch"], capsys)
        assert code == 0, err
    assert np.array_equal(cv2.imread(str(tmp_path / "plain.png")), cv2.imread(str(tmp_path / "motion.png")))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(jpeg.tobytes()[: len(jpeg) * 3 // 4])
    Image.new("RGB", (16, 16)).save(tmp_path / "icon.ico")
    for image, words in ((cut, ("truncated",)), (tmp_path / "icon.ico", ("ICO", "not supported"))):
        code, _, err = run(["predict", "-i", str(image), "--click", "1,1,+", "-o", str(tmp_path / "m.png")], capsys)
        one_error(code, err, *words)


def test_image_pixel_limits_on_every_command(tmp_path, tiny_export, dataset, capsys):
    for width, height, words in ((12000, 9000, ("12000x9000", "over the limit of 100,000,000")),
                                 (40000, 40000, ("too large to read safely",)),  # Pillow's own limit
                                 (2_000_000, 1, ("2000000x1", "too wide"))):  # OpenCV's widest
        huge = png_header_only(tmp_path / "huge.png", width, height)
        code, _, err = run(["predict", "-i", str(huge), "--click", "1,1,+", "-o", str(tmp_path / "m.png")], capsys)
        one_error(code, err, *words)
    for argv in (["predict", "-i", str(dataset / "images" / "a.png"), "--click", "1,1,+", "-o", str(tmp_path / "m.png")],
                 ["bench", "ois-tiny", "--image", str(dataset / "images" / "a.png"), "--no-sat"],
                 ["eval", "ois-tiny", "-d", str(dataset), "--max-clicks", "1"],
                 ["verify", str(tiny_export), "--images", str(dataset / "images"), "--precision", "fp32"]):
        code, _, err = run([*argv, "--max-image-pixels", "1000"], capsys)
        one_error(code, err, "80x60 = 4,800 pixels, over the limit of 1,000")
    assert not (tmp_path / "m.png").exists()


def test_exif_orientation_is_applied_and_clicks_are_taken_in_the_oriented_image(tmp_path, capsys):
    stored = np.random.default_rng(0).integers(0, 256, (90, 160, 3), dtype=np.uint8)  # 160 wide, 90 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: 90 wide, 160 high
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)
    out = tmp_path / "mask.png"
    code, _, err = run(["predict", "-i", str(path), "--click", "45,140,+", "-o", str(out)], capsys)  # row 140 < 160
    assert code == 0, err
    assert cv2.imread(str(out), cv2.IMREAD_GRAYSCALE).shape == (160, 90)
    code, _, err = run(["predict", "-i", str(path), "--click", "140,45,+", "-o", str(out)], capsys)  # column 140 > 90
    one_error(code, err, "outside the 90x160 image")


# --- 5. verify --checkpoint ---

def test_verify_refuses_a_checkpoint_of_other_weights(tiny_export, tmp_path, capsys):
    other, _ = load_model("ois-tiny", "random")
    save_checkpoint(other, tmp_path / "other.safetensors")
    code, _, err = run(["verify", str(tiny_export), "--checkpoint", str(tmp_path / "other.safetensors")], capsys)
    one_error(code, err, "its weights differ from those the export was made from")
