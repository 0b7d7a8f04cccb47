"""ort-web: the decoder graph in headless Chromium through onnxruntime-web (WASM), for parity.

The encoder runs with ONNX Runtime in Python on the CPU, as the server does for the browser
client; each decode runs in a real Chromium page with the browser client's own code
(ois_deploy/web/ois-client.js, `BrowserDecoder`), so `verify --backend ort-web` checks what a
browser computes. The page is served by a loopback HTTP server of this runner, with the COOP/COEP
headers that multithreaded WASM needs; the image state and the click inputs reach it as
safetensors blobs (float32), the logits come back as base64 float32.

A parity backend, not a serving one: one page, driven from the thread that opened it.
"""

from __future__ import annotations

import atexit
import base64
import os
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from ..contract import graph_file
from ..errors import UserError
from .base import Runner
from .ort_backend import OrtRunner

WEB_DIR = Path(__file__).resolve().parents[1] / "web"
ORT_MODULE = "ort.wasm.min.mjs"
CHROMIUM = os.environ.get("OIS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
HARNESS = b"""<!doctype html><meta charset="utf-8"><title>ort-web parity</title>
<script type="module">import * as client from "/web/ois-client.js"; window.oisClient = client;</script>"""

# In the page: load the graph once, the state when it changes, run one decode.
DECODE_JS = """async ([graph, state, clicks, threads]) => {
  const c = window.oisClient;
  const load = async (url) => (await fetch(url)).arrayBuffer();
  if (graph) window.decoder = await c.BrowserDecoder.create(new Uint8Array(await load(graph)), { threads });
  if (!clicks) return { threads: window.decoder.threads };
  if (state) window.state = window.decoder.stateTensors(c.parseSafetensors(await load(state)).tensors);
  const t = c.parseSafetensors(await load(clicks)).tensors;
  const [P, N] = t.point_labels.dims, S = t.prev_mask.dims[2];
  const out = await window.decoder.run(window.state, t.point_coords.data, t.point_labels.data, t.prev_mask.data, P, N, S);
  const bytes = new Uint8Array(out.data.buffer);
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return { logits: btoa(text), dims: out.dims };
}"""


class _Handler(SimpleHTTPRequestHandler):
    """/web/* from ois_deploy/web, /model/<decoder graph>, /blob/<name> from memory; COOP/COEP."""

    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                      ".js": "text/javascript", ".wasm": "application/wasm"}

    def __init__(self, *args, files: dict, blobs: dict, **kwargs):
        self.files, self.blobs = files, blobs
        super().__init__(*args, directory=str(WEB_DIR), **kwargs)

    def end_headers(self):
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def do_GET(self):
        path = self.path.split("?")[0]
        if path.startswith("/web/"):
            self.path = path[len("/web"):]
            return super().do_GET()  # SimpleHTTPRequestHandler keeps paths inside WEB_DIR
        data = self.blobs.get(path) if path.startswith("/blob/") else None
        if path == "/":
            data, kind = HARNESS, "text/html"
        elif path in self.files:
            data, kind = self.files[path].read_bytes(), "application/octet-stream"
        else:
            kind = "application/octet-stream"
        if data is None:
            return self.send_error(404)
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # quiet
        pass


_shared: dict = {}  # one Playwright and one Chromium per process (the sync API allows one per thread)


def _chromium():
    if "browser" not in _shared:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            raise UserError("ort-web needs Playwright's Python package: pip install 'ois-deploy[dev]' "
                            "(it drives the system Chromium; no `playwright install` needed)") from None
        _shared["playwright"] = sync_playwright().start()
        # launch() runs Chromium on a fresh temporary profile, removed when it closes.
        _shared["browser"] = _shared["playwright"].chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        atexit.register(_close_chromium)
    return _shared["browser"]


def _close_chromium() -> None:
    browser, playwright = _shared.pop("browser", None), _shared.pop("playwright", None)
    for step in (browser and browser.close, playwright and playwright.stop):
        try:
            step and step()
        except Exception:
            pass  # already gone


def _safetensors(arrays: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in arrays.items()})


class OrtWebRunner(Runner):
    name = "ort-web"
    thread_safe = False  # one page, driven through Playwright's sync API from one thread

    def __init__(self, export_dir: str | Path, precision: str = "fp32", threads: int = 0):
        self.host = OrtRunner(export_dir, precision, providers="cpu", threads=threads)  # the encoder
        super().__init__(self.host.cfg, precision, "cpu", self.host.notes)
        self.export_dir = Path(export_dir)
        if not (WEB_DIR / "vendor" / ORT_MODULE).is_file():
            raise UserError(f"onnxruntime-web is not installed in {WEB_DIR / 'vendor'}: run `make web` "
                            "(npm ci, then copies its dist files there)")
        if not Path(CHROMIUM).is_file():
            raise UserError(f"ort-web needs Chromium at {CHROMIUM}: apt-get install chromium (or set OIS_CHROMIUM)")
        self._blobs: dict[str, bytes] = {}
        decoder = graph_file("decoder", precision)
        handler = partial(_Handler, files={f"/model/{decoder}": self.export_dir / decoder}, blobs=self._blobs)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._state_of = None  # the state object the page holds
        self._thread = threading.get_ident()  # Playwright's sync API works from this thread only
        self._context = None
        try:
            browser = _chromium()
            self._context = browser.new_context()  # a page of its own: its own WASM threads
            self._page = self._context.new_page()
            self._errors: list[str] = []
            self._page.on("pageerror", lambda e: self._errors.append(str(e)))
            self._page.goto(url + "/")
            self._page.wait_for_function("window.oisClient !== undefined")
            info = self._page.evaluate(DECODE_JS, [f"/model/{decoder}", None, None, threads])
        except Exception:
            self.close()
            raise
        self.threads = info["threads"]
        self.version = self._page.evaluate("async () => (await import('/web/vendor/ort.wasm.min.mjs')).env.versions?.web ?? '?'")
        self.providers = ["CPUExecutionProvider (encoder)",
                          f"onnxruntime-web {self.version} wasm, {self.threads} thread(s), Chromium {browser.version} (decoder)"]

    def _encode(self, image: np.ndarray):
        return self.host._encode(image)

    def state_to_numpy(self, state) -> dict[str, np.ndarray]:
        return self.host.state_to_numpy(state)

    def state_from_numpy(self, arrays: dict[str, np.ndarray]):
        return self.host.state_from_numpy(arrays)  # in the graph's precision, as ort holds it

    def _decode(self, state, coords: np.ndarray, labels: np.ndarray, prev_mask: np.ndarray) -> np.ndarray:
        if threading.get_ident() != self._thread:
            raise UserError("ort-web is a parity backend driven from the thread that opened it, not a serving "
                            "one: serve with ort (browsers run the decoder themselves in browser mode)")
        state_url = None
        if state is not self._state_of:  # float32 on the wire: fp16 values convert back exactly
            self._blobs["/blob/state"] = _safetensors({k: np.asarray(v, np.float32) for k, v in state.items()})
            state_url, self._state_of = "/blob/state", state
        self._blobs["/blob/clicks"] = _safetensors({
            "point_coords": np.asarray(coords, np.float32), "point_labels": np.asarray(labels, np.int32),
            "prev_mask": np.asarray(prev_mask, np.float32)})
        out = self._page.evaluate(DECODE_JS, [None, state_url, "/blob/clicks", 0])
        if self._errors:
            raise RuntimeError(f"page error: {self._errors[-1]}")
        return np.frombuffer(base64.b64decode(out["logits"]), np.float32).reshape(out["dims"]).copy()

    def close(self) -> None:
        for step in (self._context and self._context.close, self._server.shutdown, self._server.server_close,
                     self.host.close):
            try:
                step and step()
            except Exception:
                pass  # already closed
        self._context = None


def open_runner(spec) -> OrtWebRunner:
    if spec.device not in (None, "cpu", "auto"):
        raise UserError(f"ort-web runs on the CPU (WASM); --device {spec.device} does not apply")
    return OrtWebRunner(spec.export_dir, spec.precision, threads=spec.threads)
