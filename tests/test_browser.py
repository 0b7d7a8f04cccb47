"""The browser client end to end, in a real headless Chromium (Debian's, driven by Playwright):
`ois-deploy serve` on the ois-tiny export, the page at /, clicks in server and browser (WASM)
mode against Predictor's masks for the same clicks; and `verify --backend ort-web`."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ois_deploy.runtime import ort_web_backend

WEB = Path(ort_web_backend.WEB_DIR)
DEMO = WEB.parent / "assets" / "demo.png"
pytest.importorskip("playwright", reason="Playwright's Python package is not installed (pip install 'ois-deploy[dev]')")
pytest.importorskip("fastapi", reason="the serve extra is not installed")
if not Path(ort_web_backend.CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {ort_web_backend.CHROMIUM} (apt-get install chromium)", allow_module_level=True)
if not (WEB / "vendor" / ort_web_backend.ORT_MODULE).is_file():
    pytest.skip("onnxruntime-web is not in ois_deploy/web/vendor (make web)", allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402

from ois_deploy.runtime.predictor import Predictor  # noqa: E402
from ois_deploy.runtime.preprocess import read_image  # noqa: E402
from ois_deploy.serve.masks import rle_decode  # noqa: E402

coco = pytest.importorskip("pycocotools.mask", reason="pycocotools is not installed (pip install 'ois-deploy[dev]')")

pytestmark = pytest.mark.slow
CLICKS = [(122, 188, True), (200, 60, False), (60, 200, True)]  # front ellipse, not the back one


@pytest.fixture(scope="module")
def chromium():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=ort_web_backend.CHROMIUM, args=ort_web_backend.CHROMIUM_ARGS)
        yield browser
        browser.close()


def start_serve(export_dir: Path, precision: str, *args: str):
    """`ois-deploy serve` on a free loopback port; returns (process, URL) from its first line."""
    proc = subprocess.Popen([sys.executable, "-m", "ois_deploy", "serve", str(export_dir), "--port", "0",
                             "--precision", precision, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if match := re.search(r"http://\S+", line):
            return proc, match.group(0)
    proc.wait()
    raise AssertionError(f"serve did not start: {proc.stderr.read()}")


@pytest.fixture(scope="module", params=["fp32", "fp16"])
def server(request, tiny_export):
    proc, url = start_serve(tiny_export, request.param)
    yield url, request.param
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


SESSION_JS = """async ([clicks, precision]) => {
  const blob = await (await fetch("/demo.png")).blob();
  const info = await ois.setImage(blob);
  const out = { info, isolated: crossOriginIsolated, server: [], browser: [] };
  for (const [x, y, p] of clicks) out.server.push(await ois.click(x, y, p));
  ois.reset();
  ois.precision = precision;
  await ois.setMode("browser");
  for (const [x, y, p] of clicks) out.browser.push(await ois.click(x, y, p));
  out.undo = await ois.undo();
  out.redo = await ois.click(...clicks[clicks.length - 1]);
  out.threads = ois.wasmThreads;
  out.stateBytes = ois.stateBytes;
  return out;
}"""


def open_page(chromium, url, fragment: str = ""):
    """The page at `/`, and the list its console errors and uncaught exceptions go into."""
    page = chromium.new_page()
    errors = []
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/" + fragment)
    return page, errors


def test_page_segments_in_both_modes(server, chromium, tiny_export):
    url, precision = server
    page, errors = open_page(chromium, url)
    page.wait_for_function("window.ois !== undefined")
    out = page.evaluate(SESSION_JS, [CLICKS, precision])
    assert errors == []
    assert out["info"]["width"] == 480 and out["info"]["height"] == 360
    assert out["isolated"] is True and out["threads"] >= 1  # COOP/COEP from serve: WASM may use threads
    assert out["stateBytes"] > 1_000_000  # ois-tiny's state, float32

    predictor = Predictor.open(str(tiny_export), backend="ort", precision=precision)
    predictor.set_image(read_image(DEMO))
    expected = [predictor.click(*c).mask for c in CLICKS]
    for want, server_result, browser_result in zip(expected, out["server"], out["browser"]):
        assert server_result["mode"] == "server" and browser_result["mode"] == "browser"
        assert server_result["area"] == int(want.sum())
        assert iou(rle_decode(server_result["mask"]), want) >= 0.999
        rle = browser_result["mask"]  # encoded in JS: read it as pycocotools does
        got = coco.decode(coco.frPyObjects(rle, *rle["size"])).astype(bool)
        assert browser_result["area"] == int(got.sum())
        assert iou(got, want) >= 0.98
    assert out["undo"]["mask"] == out["browser"][1]["mask"]  # undo: the mask of the first two clicks
    assert out["redo"]["mask"] == out["browser"][2]["mask"]
    page.close()


def test_verify_ort_web(tiny_export, tmp_path):
    """verify --backend ort-web: the decoder in Chromium against PyTorch FP32, ort's tolerances."""
    report = tmp_path / "verify.json"
    done = subprocess.run([sys.executable, "-m", "ois_deploy", "verify", str(tiny_export), "--backend", "ort-web",
                           "--json", str(report)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(report.read_text())
    assert result["passed"] and result["backend"] == "ort-web"
    precisions = {row["precision"] for row in result["results"]}
    assert precisions == {"fp32", "fp16"}
    assert any("onnxruntime-web" in p for p in result["providers"])


def test_page_ui(server, chromium):
    """The page as a person uses it: demo image, left click, shift-click and right click, undo, reset."""
    url, _ = server
    page, errors = open_page(chromium, url)
    page.click("#demo")
    page.wait_for_function("document.getElementById('s-image').textContent === '480x360'")
    box = page.locator("#canvas").bounding_box()

    def click(x, y, clicks, **how):
        page.mouse.move(box["x"] + x + 0.5, box["y"] + y + 0.5)
        page.mouse.down(**how)
        page.mouse.up(**how)
        page.wait_for_function(f"document.getElementById('s-clicks').textContent === '{clicks}'")

    click(122, 188, 1)
    page.keyboard.down("Shift")
    click(200, 60, 2)
    page.keyboard.up("Shift")
    click(240, 230, 3, button="right")
    assert page.evaluate("ois.clicks") == [[122, 188, True], [200, 60, False], [240, 230, False]]
    assert int(page.text_content("#s-area").split()[0]) > 1000
    page.click("#undo")
    page.wait_for_function("document.getElementById('s-clicks').textContent === '2'")
    page.click("#reset")
    page.wait_for_function("document.getElementById('s-clicks').textContent === '0'")
    assert page.text_content("#s-area") == "–"
    assert errors == []
    page.close()


def test_page_behind_an_api_key(tiny_export, chromium):
    """serve --api-key: the page and its files load without the key, and the page sends the key
    given in its URL's fragment (#key=..., never sent to the server) with its API calls: it
    segments. The same page without the key is told 401 by the API."""
    proc, url = start_serve(tiny_export, "fp32", "--api-key", "page-test-key")
    try:
        page, errors = open_page(chromium, url, "#key=page-test-key")
        page.click("#demo")
        page.wait_for_function("document.getElementById('s-image').textContent === '480x360'")
        box = page.locator("#canvas").bounding_box()
        page.mouse.click(box["x"] + 122.5, box["y"] + 188.5)
        page.wait_for_function("document.getElementById('s-clicks').textContent === '1'")
        assert int(page.text_content("#s-area").split()[0]) > 1000
        assert errors == []
        page.close()
        anonymous = chromium.new_page()
        anonymous.goto(url + "/")
        status = anonymous.evaluate("fetch('/v1/model').then((r) => r.status)")
        assert status == 401
        anonymous.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


HELPERS_JS = """async ([src, h, w, crop, out, frames, mask, st]) => {
  const c = await import("/ois-client.js");
  const resized = c.resizeLinear(Float32Array.from(src), w, crop[0], crop[1], out[0], out[1]);
  const mapped = frames.map(([H, W, S, x]) => new c.Frame(H, W, S)).map((f, i) => [f.resized, f.toInput(frames[i][3])]);
  const bytes = Uint8Array.from(atob(st), (ch) => ch.charCodeAt(0)).buffer;
  const parsed = c.parseSafetensors(bytes);
  return { resized: Array.from(resized), mapped, rle: c.encodeRle(Uint8Array.from(mask), h, w),
           decoded: Array.from(c.decodeRle(c.encodeRle(Uint8Array.from(mask), h, w))),
           tensors: Object.fromEntries(Object.entries(parsed.tensors).map(([k, t]) => [k, [Array.from(t.data), t.dims]])) };
}"""


def test_client_helpers_match_python(server, chromium, rng):
    """ois-client.js's host steps against the Python ones: OpenCV's bilinear resize (crop,
    up and down), Frame geometry and click mapping, RLE, safetensors (float32 and float16)."""
    import base64

    import cv2
    from safetensors.numpy import save

    from ois_deploy.runtime.preprocess import Frame
    from ois_deploy.serve.masks import rle_encode

    url, _ = server
    page = chromium.new_page()
    page.goto(url + "/")
    h, w = 37, 53
    src = rng.normal(0, 3, (h, w)).astype(np.float32)
    mask = rng.random((h, w)) < 0.5
    mask[0, 0] = True  # a mask starting with foreground: counts start with 0
    frames = [(360, 480, 280, 479.0), (5, 400, 280, 3.0), (1022, 17, 1022, 16.0), (333, 1000, 280, 0.0)]
    arrays = {"a": rng.normal(size=(2, 3)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float16)}
    for crop, out in [((h, w), (80, 120)), ((h, w), (11, 7)), ((20, 30), (61, 45)), ((h, w), (h, w))]:
        got = page.evaluate(HELPERS_JS, [src.ravel().tolist(), h, w, crop, out, frames, mask.ravel().astype(int).tolist(),
                                         base64.b64encode(save(arrays)).decode()])
        resized = np.array(got["resized"], np.float32).reshape(out)
        # OpenCV's own INTER_LINEAR to float rounding; opencv-python's default path through Intel
        # IPP (what Predictor gets) rounds its coefficients differently: up to ~2e-5 here, on values
        # of a few units; a mask pixel can differ only where a logit is that close to 0.
        use_ipp = cv2.ipp.useIPP()
        try:
            cv2.ipp.setUseIPP(False)
            want = cv2.resize(src[:crop[0], :crop[1]], (out[1], out[0]), interpolation=cv2.INTER_LINEAR)
        finally:
            cv2.ipp.setUseIPP(use_ipp)
        np.testing.assert_allclose(resized, want, rtol=1e-6, atol=1e-6)
        ipp = cv2.resize(src[:crop[0], :crop[1]], (out[1], out[0]), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(resized, ipp, rtol=0, atol=5e-5)
    for (H, W, S, x), (resized, mapped) in zip(frames, got["mapped"]):
        frame = Frame(H, W, S)
        assert tuple(resized) == frame.resized
        assert mapped == float(frame.to_input(np.array([x], np.float32))[0])
    assert got["rle"] == rle_encode(mask)
    assert np.array_equal(np.array(got["decoded"], bool).reshape(h, w), mask)
    for name, array in arrays.items():
        data, dims = got["tensors"][name]
        assert dims == list(array.shape)
        assert np.array_equal(np.array(data, np.float32).reshape(array.shape), array.astype(np.float32))
    page.close()
