"""The contract of the HTTP API v1 (docs/serving.md), as tests over HTTP only.

A test module runs them by importing this module's names (`from serve_contract import *`) and
providing one session fixture, `launch`: a function launch(**options) -> Server that starts a
server for the ois-tiny export with the options of `ois-deploy serve` (api_key, allow_origin,
cache_mb, max_body_mb, max_image_pixels) and stops it at the end of the session. test_serve.py
starts `ois-deploy serve` processes; another deployment (Ray Serve) passes the same tests with
its own `launch`. Masks are compared with the in-process Predictor on the same export: identical.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from ois_deploy.contract import ENCODER_OUTPUTS, manifest_config, read_manifest, state_shapes
from ois_deploy.evaluate.clicker import Clicker
from ois_deploy.provenance import sha256_file
from ois_deploy.runtime.predictor import Predictor
from ois_deploy.runtime.preprocess import decode_image
from ois_deploy.train.scenes import make_scene

# The options every contract server runs with: small limits, so that going over them is cheap.
MAX_BODY_MB = 1
MAX_IMAGE_PIXELS = 1_000_000
ALLOWED_ORIGIN = "http://allowed.example"
KEY = "contract-test-key"
SMALL_CACHE_MB = 1  # under one ois-tiny image state (1.2 MB): every new image evicts the others


@dataclass
class Server:
    base_url: str
    export_dir: Path  # the export it serves, for the in-process reference
    backend: str = "ort"
    precision: str = "fp32"
    api_key: str | None = None
    # The deployment keeps the kept prefixes of one image in one place, so that a request that
    # extends a known sequence costs exactly one decode (a router without affinity may not).
    one_decode_per_extension: bool = True
    extra: dict = field(default_factory=dict)

    def __iter__(self):  # unpacks as (base_url, info)
        return iter((self.base_url, self))

    def client(self, key: str | None = "default", **kwargs) -> httpx.Client:
        key = self.api_key if key == "default" else key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60, **kwargs)


OPTIONS = {"max_body_mb": MAX_BODY_MB, "max_image_pixels": MAX_IMAGE_PIXELS}


@pytest.fixture(scope="session")
def server(launch) -> Server:
    return launch(**OPTIONS)


@pytest.fixture(scope="session")
def keyed_server(launch) -> Server:
    return launch(**OPTIONS, api_key=KEY, allow_origin=[ALLOWED_ORIGIN])


@pytest.fixture(scope="session")
def small_cache_server(launch) -> Server:
    return launch(**OPTIONS, cache_mb=SMALL_CACHE_MB)


@pytest.fixture(scope="session")
def api(server):
    with server.client() as client:
        yield client


# -- images and the in-process reference -----------------------------------------------------
def png_bytes(rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


def scene(seed: int, h: int = 150, w: int = 200):
    """(PNG bytes, ground-truth mask of its largest object) of a generated scene."""
    s = make_scene(seed, h, w, objects=3)
    gt = max(s.masks, key=lambda m: m.sum())
    return png_bytes(s.image), gt


@pytest.fixture(scope="session")
def reference(server):
    """A Predictor on the served export: reference(image bytes, clicks) -> the mask after each click."""
    predictor = Predictor.open(str(server.export_dir), backend=server.backend, precision=server.precision)

    def masks(data: bytes, clicks) -> list[np.ndarray]:
        predictor.set_image(decode_image(data))
        return [predictor.click(x, y, p).mask for x, y, p in clicks]

    masks.predictor = predictor
    return masks


def clicker_session(reference, data: bytes, gt: np.ndarray, n: int):
    """n clicks of the evaluation's clicker on gt, driven by the Predictor's masks."""
    predictor = reference.predictor
    predictor.set_image(decode_image(data))
    clicker, pred, clicks = Clicker(gt), np.zeros_like(gt), []
    for _ in range(n):
        c = clicker.next_click(pred)
        clicks.append((c.x, c.y, c.positive))
        pred = predictor.click(c.x, c.y, c.positive).mask
    return clicks


def as_json(clicks) -> list[dict]:
    return [{"x": x, "y": y, "positive": p} for x, y, p in clicks]


def upload(client: httpx.Client, data: bytes) -> dict:
    r = client.post("/v1/images", content=data)
    assert r.status_code == 200, r.text
    return r.json()


def ask(client: httpx.Client, image_id: str, clicks, fmt: str | None = "rle") -> dict:
    body = {"clicks": as_json(clicks)} if fmt is None else {"clicks": as_json(clicks), "format": fmt}
    r = client.post(f"/v1/images/{image_id}/masks", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def coco_decode(rle: dict) -> np.ndarray:
    from pycocotools import mask as mask_utils

    h, w = rle["size"]
    return mask_utils.decode(mask_utils.frPyObjects(rle, h, w)).astype(bool)


def assert_error(r: httpx.Response, status: int | tuple, *words: str) -> None:
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"]
    assert "\n" not in body["error"] and "Traceback" not in body["error"]
    for word in words:
        assert word.lower() in body["error"].lower(), body["error"]


# -- images ----------------------------------------------------------------------------------
def test_upload_gives_content_id_and_caches(api):
    data, _ = scene(1)
    first = upload(api, data)
    assert first["image_id"] == hashlib.sha256(data).hexdigest()
    assert (first["width"], first["height"]) == (200, 150)
    again = upload(api, data)
    assert again["cached"] and again["image_id"] == first["image_id"] and again["encoder_ms"] == 0


def test_delete_then_404(api):
    data, _ = scene(2)
    image_id = upload(api, data)["image_id"]
    assert api.delete(f"/v1/images/{image_id}").status_code == 204
    assert_error(api.post(f"/v1/images/{image_id}/masks", json={"clicks": [{"x": 1, "y": 1}]}), 404, "post the image")
    assert_error(api.get(f"/v1/images/{image_id}/state"), 404)
    assert_error(api.delete(f"/v1/images/{image_id}"), 404)
    assert not upload(api, data)["cached"]  # posting it again works


# -- masks: formats and replay identity -------------------------------------------------------
def test_formats_agree_with_predictor(api, reference):
    data, gt = scene(3)
    clicks = clicker_session(reference, data, gt, 3)
    want = reference(data, clicks)[-1]
    image_id = upload(api, data)["image_id"]
    rle = ask(api, image_id, clicks, None)  # rle is the default
    assert rle["format"] == "rle" and rle["clicks"] == 3 and rle["area"] == int(want.sum())
    assert rle["mask"]["size"] == [150, 200]
    assert np.array_equal(coco_decode(rle["mask"]), want)
    png = ask(api, image_id, clicks, "png")
    decoded = cv2.imdecode(np.frombuffer(base64.b64decode(png["mask"]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(decoded > 127, want)
    polygons = ask(api, image_id, clicks, "polygons")["mask"]
    assert polygons and all(len(p) >= 6 and len(p) % 2 == 0 for p in polygons)
    filled = np.zeros(want.shape, np.uint8)
    cv2.fillPoly(filled, [np.array(p, np.int32).reshape(-1, 2) for p in polygons], 1)
    iou = (filled.astype(bool) & want).sum() / max(1, (filled.astype(bool) | want).sum())
    assert iou > 0.9  # outer boundaries only: holes are not in polygons


def test_replay_identity(server, api, reference):
    """Extending by one click, an undo, a fresh sequence: all identical to Predictor."""
    data, gt = scene(4)
    clicks = clicker_session(reference, data, gt, 6)
    want = reference(data, clicks)
    image_id = upload(api, data)["image_id"]
    for k in range(1, len(clicks) + 1):  # one click at a time, as an annotation tool sends them
        r = ask(api, image_id, clicks[:k])
        assert np.array_equal(coco_decode(r["mask"]), want[k - 1]), f"click {k}"
        if server.one_decode_per_extension:
            assert r["decodes"] == 1
    undo = ask(api, image_id, clicks[:4])  # undo two clicks
    assert np.array_equal(coco_decode(undo["mask"]), reference(data, clicks[:4])[-1])
    other = [(20.0, 30.0, True), (150.5, 100.25, False), (60.0, 70.0, True)]  # a fresh sequence
    r = ask(api, image_id, other)
    assert r["decodes"] == 3 and np.array_equal(coco_decode(r["mask"]), reference(data, other)[-1])


def test_replay_after_eviction(small_cache_server, reference):
    """A cache smaller than one image state: every other image evicts it mid-session; the client
    posts the image again and the sequence is replayed, identical to Predictor. Three sessions:
    a deployment with two caches (replicas, each image routed to one of them) evicts too."""
    sessions = []
    for seed in (5, 6, 13):
        data, gt = scene(seed)
        clicks = clicker_session(reference, data, gt, 4)
        sessions.append((data, clicks, reference(data, clicks)))
    with small_cache_server.client() as client:
        for k in range(1, 5):  # three annotators' sessions interleaved, click by click
            for data, clicks, want in sessions:
                image_id = hashlib.sha256(data).hexdigest()
                r = client.post(f"/v1/images/{image_id}/masks", json={"clicks": as_json(clicks[:k])})
                if r.status_code == 404:
                    assert_error(r, 404, "post the image")
                    upload(client, data)
                    r = client.post(f"/v1/images/{image_id}/masks", json={"clicks": as_json(clicks[:k])})
                assert r.status_code == 200, r.text
                assert np.array_equal(coco_decode(r.json()["mask"]), want[k - 1])
        metrics = client.get("/metrics").text
    assert _sample(metrics, "ois_cache_evictions_total") > 0


def test_slow_client_does_not_stall_others(server, api):
    """An upload stalled half-way (a client on a slow link) holds no worker: another client's
    upload and clicks are answered while it waits."""
    (slow_data, _), (data, _) = scene(12), scene(13)
    release, halfway, result = threading.Event(), threading.Event(), {}

    def body():
        yield slow_data[: len(slow_data) // 2]
        halfway.set()
        release.wait(120)
        yield slow_data[len(slow_data) // 2:]

    def slow():
        with server.client() as client:
            result["r"] = client.post("/v1/images", content=body())

    thread = threading.Thread(target=slow)
    thread.start()
    try:
        assert halfway.wait(60)
        image_id = upload(api, data)["image_id"]
        assert ask(api, image_id, [(10, 10, True), (50, 60, False)])["clicks"] == 2
        assert thread.is_alive() and "r" not in result  # still waiting for the rest of its body
    finally:
        release.set()
        thread.join(120)
    assert result["r"].status_code == 200


# -- state and model -------------------------------------------------------------------------
def test_state_is_safetensors_of_the_contract(server, api, reference):
    from safetensors.numpy import load

    data, _ = scene(7)
    image_id = upload(api, data)["image_id"]
    r = api.get(f"/v1/images/{image_id}/state")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    arrays = load(r.content)
    cfg = manifest_config(read_manifest(server.export_dir))
    assert {k: v.shape for k, v in arrays.items()} == state_shapes(cfg)
    assert set(arrays) == set(ENCODER_OUTPUTS)
    (n,) = struct.unpack("<Q", r.content[:8])
    meta = json.loads(r.content[8:8 + n])["__metadata__"]
    assert (int(meta["width"]), int(meta["height"]), int(meta["input_size"])) == (200, 150, cfg.input_size)
    predictor = reference.predictor
    predictor.set_image(decode_image(data))
    local = predictor.runner.state_to_numpy(predictor._encoded.state)
    for name in ENCODER_OUTPUTS:
        np.testing.assert_allclose(arrays[name], local[name], rtol=1e-5, atol=1e-5)


def test_model_info_and_decoder_graphs(server, api):
    info = api.get("/v1/model").json()
    manifest = read_manifest(server.export_dir)
    assert info["backend"] == server.backend and info["precision"] == server.precision
    assert info["max_clicks"] == manifest["config"]["decoder"]["max_clicks"]
    assert info["manifest"]["model_hash"] == manifest["model_hash"]
    assert set(info["decoder_graphs"]) == set(manifest["precisions"])
    for url in info["decoder_graphs"].values():
        r = api.get(url)
        assert r.status_code == 200
        name = url.rsplit("/", 1)[1]
        assert hashlib.sha256(r.content).hexdigest() == manifest["graphs"][name]["sha256"]
        assert sha256_file(server.export_dir / name) == manifest["graphs"][name]["sha256"]
    for name in ("encoder.onnx", "manifest.json", "..%2Fmanifest.json", "%2E%2E", "decoder.onnx.bak"):
        assert_error(api.get(f"/v1/model/{name}"), 404)
    # No path of the exporting machine: the weights file by name only.
    assert info["manifest"]["weights"]["path"] == Path(manifest["weights"]["path"]).name
    assert str(Path(manifest["weights"]["path"]).parent) not in json.dumps(info)


# -- bad requests ----------------------------------------------------------------------------
def test_bad_images(api):
    data, _ = scene(8)
    assert_error(api.post("/v1/images", content=b""), 400, "empty")
    assert_error(api.post("/v1/images", content=b"not an image at all"), 400)
    assert_error(api.post("/v1/images", content=data[: len(data) // 2]), 400)  # truncated PNG
    ok, jpeg = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (128, 128, 3), np.uint8))
    assert_error(api.post("/v1/images", content=jpeg.tobytes()[: len(jpeg) * 3 // 4]), 400, "truncated")


def png_header(width: int, height: int) -> bytes:
    """A PNG's signature and header of any size, without pixels (enough to be refused by size)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


def test_images_as_phones_and_other_tools_write_them(api):
    """Data after a JPEG's end marker (a motion photo's video, a vendor's trailer) is not part of
    the image: same size and same mask as without it. Formats that are not read are named as
    such (400); sizes over the limits are 413, whatever the header says."""
    import io

    from PIL import Image

    data, _ = scene(14)
    jpeg = cv2.imencode(".jpg", cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))[1].tobytes()
    with_trailer = jpeg + b"\x00\x00\x00\x18ftypmp42" + bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8))
    plain, trailed = upload(api, jpeg), upload(api, with_trailer)
    assert (trailed["width"], trailed["height"]) == (plain["width"], plain["height"]) == (200, 150)
    clicks = [(100, 75, True), (20, 20, False)]
    assert ask(api, trailed["image_id"], clicks)["mask"] == ask(api, plain["image_id"], clicks)["mask"]
    for fmt in ("ICO", "TGA", "GIF"):
        out = io.BytesIO()
        Image.new("RGB", (32, 32)).save(out, fmt)
        assert_error(api.post("/v1/images", content=out.getvalue()), 400, fmt, "not supported")
    assert_error(api.post("/v1/images", content=png_header(2_000_000, 1)), 413, "2000000x1")
    assert_error(api.post("/v1/images", content=png_header(50_000, 50_000)), 413)


def test_too_large(api):
    body = b"\x89PNG" + bytes(MAX_BODY_MB * (1 << 20))
    assert_error(api.post("/v1/images", content=body), 413, "limit")

    def chunks():  # no Content-Length: the limit holds while streaming
        for _ in range(MAX_BODY_MB * 4 + 4):
            yield bytes(1 << 18)

    assert_error(api.post("/v1/images", content=chunks()), 413, "limit")
    big = cv2.imencode(".png", np.zeros((1001, 1000), np.uint8))[1].tobytes()  # small file, too many pixels
    assert len(big) < MAX_BODY_MB * (1 << 20)
    assert_error(api.post("/v1/images", content=big), 413, "pixels")


def test_bad_clicks(api):
    data, _ = scene(9)
    image_id = upload(api, data)["image_id"]
    url = f"/v1/images/{image_id}/masks"
    missing = "0" * 64
    assert_error(api.post(f"/v1/images/{missing}/masks", json={"clicks": [{"x": 1, "y": 1}]}), 404, "post the image")
    assert_error(api.post("/v1/images/not-an-id/masks", json={"clicks": [{"x": 1, "y": 1}]}), 422)
    assert_error(api.post(url, json={"clicks": [{"x": 200, "y": 10}]}), 400, "outside")
    assert_error(api.post(url, json={"clicks": [{"x": -1, "y": 10}]}), 400, "outside")
    assert_error(api.post(url, json={"clicks": [{"x": 10, "y": 150}]}), 400, "outside")
    for raw in ('{"clicks": [{"x": NaN, "y": 1}]}', '{"clicks": [{"x": 1, "y": Infinity}]}',
                '{"clicks": [{"x": 1e999, "y": 1}]}'):
        assert_error(api.post(url, content=raw, headers={"content-type": "application/json"}), (400, 422), "finite")
    assert_error(api.post(url, json={"clicks": []}), 422, "clicks")
    assert_error(api.post(url, json={}), (400, 422), "clicks")
    assert_error(api.post(url, json={"clicks": [{"x": 1, "y": 1}] * 25}), 422, "24")
    assert_error(api.post(url, json={"clicks": [{"x": 1, "y": 1}], "format": "gif"}), (400, 422), "format")
    assert_error(api.post(url, json={"clicks": [{"x": "left", "y": 1}]}), (400, 422))
    assert_error(api.post(url, content='{"clicks": [', headers={"content-type": "application/json"}), 400, "JSON")
    assert_error(api.post(url, content="", headers={"content-type": "application/json"}), (400, 422))
    assert_error(api.get("/v1/nothing-here"), 404)
    assert_error(api.put("/v1/images"), 405)


def test_one_status_per_cause(api):
    """A click body is a few KiB: 413 over 64 KiB (--max-body-mb is for uploads); JSON sent as
    another content type: 415; HEAD where GET is; a trailing slash is not redirected (Starlette
    would build the Location from the Host header)."""
    data, _ = scene(15)
    url = f"/v1/images/{upload(api, data)['image_id']}/masks"
    assert_error(api.post(url, json={"clicks": [{"x": 1, "y": 1}], "pad": "x" * 70_000}), 413, "64 KiB")
    assert_error(api.post(url, content='{"clicks": [{"x": 1, "y": 1}]}', headers={"content-type": "text/plain"}),
                 415, "application/json")
    for path in ("/healthz", "/v1/model", "/"):
        head, get = api.head(path), api.get(path)
        assert head.status_code == get.status_code == 200 and head.content == b""
        assert head.headers["content-type"] == get.headers["content-type"]
    r = api.get("/v1/model/", headers={"Host": "evil.example"})
    assert r.status_code == 404 and "evil" not in r.headers.get("location", "")


# -- access ----------------------------------------------------------------------------------
def test_api_key(keyed_server):
    with keyed_server.client(key=None) as anonymous, keyed_server.client(key="wrong") as wrong, \
            keyed_server.client() as right:
        for client in (anonymous, wrong):
            assert_error(client.get("/v1/model"), 401, "api key")
            assert_error(client.post("/v1/images", content=b"x"), 401)
            assert_error(client.get("/metrics"), 401)
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        assert anonymous.get("/readyz").json() == {"ready": True}
        assert right.get("/v1/model").status_code == 200
        assert right.get("/metrics").status_code == 200
        for scheme in ("bearer", "BEARER"):  # schemes are case-insensitive (RFC 9110)
            assert anonymous.get("/v1/model", headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200


def test_page_and_client_are_open_behind_the_key(keyed_server):
    """The page holds no data: it loads without the key and sends the one in its URL's #key=."""
    with keyed_server.client(key=None) as anonymous:
        page = anonymous.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert anonymous.get("/ois-client.js").status_code == 200
        assert anonymous.get("/demo.png").headers["content-type"] == "image/png"
        assert anonymous.get("/openapi.json").status_code == 200
        for path in ("/v1/model", "/metrics", "/anything-else", "/../manifest.json"):  # closed unless open by name
            assert_error(anonymous.get(path), 401)


def test_cors(keyed_server):
    with keyed_server.client() as client:
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        ok = client.options("/v1/images", headers={"Origin": ALLOWED_ORIGIN, **preflight})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
        refused = client.options("/v1/images", headers={"Origin": "http://evil.example", **preflight})
        assert_error(refused, 400, "origin")
        assert "access-control-allow-origin" not in refused.headers
        simple = client.get("/v1/model", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in simple.headers
        allowed = client.get("/v1/model", headers={"Origin": ALLOWED_ORIGIN})
        assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN


def test_cross_origin_isolation_headers(api):
    for r in (api.get("/healthz"), api.get("/v1/model"), api.get("/v1/nothing-here")):
        assert r.headers["cross-origin-opener-policy"] == "same-origin"
        assert r.headers["cross-origin-embedder-policy"] == "require-corp"


# -- operations ------------------------------------------------------------------------------
def _sample(text: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = None
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total = (total or 0) + s.value
    assert total is not None, f"no {name} {labels} in /metrics"
    return total


def test_metrics(api):
    data, _ = scene(10)
    image_id = upload(api, data)["image_id"]
    ask(api, image_id, [(5, 5, True)])
    text = api.get("/metrics").text
    assert _sample(text, "ois_http_requests_total", route="/v1/images", method="POST") >= 1
    assert _sample(text, "ois_http_requests_total", route="/v1/images/{image_id}/masks", status="200") >= 1
    assert _sample(text, "ois_http_request_duration_seconds_count", route="/v1/images/{image_id}/masks") >= 1
    assert _sample(text, "ois_encoder_seconds_count") >= 1
    assert _sample(text, "ois_decoder_seconds_count") >= 1
    assert _sample(text, "ois_cache_entries") >= 1
    assert _sample(text, "ois_cache_bytes") > 0
    assert _sample(text, "ois_cache_hits_total") >= 1
    assert _sample(text, "ois_cache_misses_total") >= 1
    assert math.isfinite(_sample(text, "ois_cache_evictions_total"))


def test_openapi_names_the_routes(api):
    paths = api.get("/openapi.json").json()["paths"]
    for path in ("/v1/images", "/v1/images/{image_id}/masks", "/v1/images/{image_id}/state",
                 "/v1/images/{image_id}", "/v1/model", "/v1/model/{file}", "/healthz", "/readyz", "/metrics"):
        assert path in paths
