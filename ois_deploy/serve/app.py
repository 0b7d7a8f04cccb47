"""The HTTP API v1 (docs/serving.md) over a SegmentationService, on FastAPI.

Every v1 route awaits only the service's methods (add_image, masks, state, delete, model_file,
stats, model_info, ready), so any object with the same methods gets the same API. Errors of every
kind leave as a 4xx with {"error": "one line"}; an unexpected exception is logged and answered
with a 500 without its traceback.

The middleware bounds what a client can make the server hold: a body limit per route (an upload
gets --max-body-mb, every other route a few KiB), the body's read timeout, and the cancellation
of work whose client has gone (server.py bounds the connections and request heads).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import inspect
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal, Union
from urllib.parse import urlsplit

import anyio

from fastapi import FastAPI, Path as PathParam, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field, create_model
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.staticfiles import StaticFiles

from .. import __version__
from ..errors import UserError
from .limits import UploadBudget, client_of
from .metrics import Metrics
from .server import MAX_HEAD_BYTES
from .service import ApiError

log = logging.getLogger("ois_deploy.serve")

WEB_DIR = Path(__file__).resolve().parents[1] / "web"  # the browser client, mounted at / when present
# Open without the API key (every other path needs it, routes added later included): health, the
# schema, and the browser page's files (mount_static), which hold no data.
OPEN_PATHS = ("/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/demo.png")
JSON_BODY_BYTES = 64 * 1024  # any route but uploads: 24 clicks are under 2 KiB
LABEL_STUDIO_TASK_BYTES = 4 << 20  # Label Studio's /predict: the task, with its annotations (brush RLEs)
MIN_BODY_RATE = 16 * 1024  # bytes/s a body must bring in each window of the read timeout
DEFAULT_MAX_CLICKS = 24  # the schema's bound when the service's model_info() is async (unknown here)
IMAGE_ID = PathParam(pattern="^[0-9a-f]{64}$", description="SHA-256 (hex) of the image file's bytes.")


# -- bodies ---------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    error: str = Field(description="What was wrong, in one line.")


class ImageInfo(BaseModel):
    image_id: str = Field(description="SHA-256 (hex) of the posted bytes; posting them again is a cache hit.")
    width: int
    height: int
    encoder_ms: float = Field(description="Encoder time; 0 when cached.")
    cached: bool


class Click(BaseModel):  # strict: JSON types as the schema says them (no "1" for 1, no 0 for false)
    x: float = Field(strict=True, allow_inf_nan=False, description="Column, in image pixels (0 <= x < width).")
    y: float = Field(strict=True, allow_inf_nan=False, description="Row, in image pixels (0 <= y < height).")
    positive: bool = Field(True, strict=True, description="true: on the object; false: background.")


def masks_request(max_clicks: int) -> type[BaseModel]:
    """The masks route's body, its click list bounded by the model's max_clicks in the schema."""
    return create_model(
        "MasksRequest",
        clicks=(list[Click], Field(min_length=1, max_length=max_clicks,
                                   description="The whole click sequence so far, in order.")),
        format=(Literal["rle", "png", "polygons"], Field("rle", description="Encoding of the returned mask.")))


class RLE(BaseModel):
    size: list[int] = Field(min_length=2, max_length=2, description="[height, width]")
    counts: list[int] = Field(description="COCO uncompressed RLE: column-major runs, background first.")


class MaskResponse(BaseModel):
    image_id: str
    width: int
    height: int
    clicks: int = Field(description="Number of clicks decoded.")
    decoder_ms: float = Field(description="Decoder time of this request (all clicks it replayed).")
    decodes: int = Field(description="Decoder runs: 1 when the sequence extends a kept one, else the replayed clicks.")
    area: int = Field(description="Mask pixels.")
    format: Literal["rle", "png", "polygons"]
    mask: Union[RLE, str, list[list[int]]] = Field(
        description="rle: {size, counts}; png: base64 of a 0/255 PNG; polygons: [[x0, y0, x1, y1, ...], ...].")


class ModelInfo(BaseModel):
    backend: str
    precision: str
    preset: str
    input_size: int
    max_clicks: int
    formats: list[str]
    decoder_graphs: dict[str, str] = Field(description="precision -> URL of the decoder graph (ONNX).")
    manifest: Union[dict[str, Any], None] = Field(description="The export folder's manifest.json (null for a preset).")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    ready: bool


def _errors(*codes: int) -> dict:
    text = {400: "Bad request", 401: "Missing or wrong API key", 404: "Not found", 408: "The body came too slowly",
            413: "Too large", 415: "Not JSON", 422: "Invalid request body or parameters",
            503: "Not ready, or busy (Retry-After)"}
    return {code: {"model": ErrorBody, "description": text[code]} for code in codes}


BINARY = {"schema": {"type": "string", "format": "binary"}}


# -- middleware (pure ASGI: no buffering of bodies) ------------------------------------------
def _json_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status, headers=headers)


CLOSE = {"Connection": "close"}  # a refused body is not read: the connection cannot carry another request


class BodyGuard:
    """What a request may send, bounded: its head (431 over MAX_HEAD_BYTES, whether it came in
    one read or several) and its body: 413 over the route's limit (from Content-Length before
    reading, or counted while it streams), 408 when a part takes over `read_timeout` seconds to
    come, when a window of `read_timeout` seconds brings under MIN_BODY_RATE (a client trickling
    bytes after a fast start included), or when the whole body takes over `body_deadline`.
    Once the body is in, receive() is passed through untouched: the app (a FileResponse while it
    sends) may then wait on it for as long as the response takes."""

    def __init__(self, app, limits: dict[tuple[str, str], int], read_timeout: float, body_deadline: float):
        self.app, self.limits, self.read_timeout, self.body_deadline = app, limits, read_timeout, body_deadline

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if head_bytes(scope) > MAX_HEAD_BYTES:
            return await _json_response(431, f"the request head is over this server's limit of "
                                             f"{MAX_HEAD_BYTES // 1024} KiB", CLOSE)(scope, receive, send)
        limit = self.limits.get((scope["method"], scope["path"]), JSON_BODY_BYTES)
        too_large = f"the request body is over this route's limit of {_size(limit)}"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _json_response(413, too_large, CLOSE)(scope, receive, send)
        seen, start, window, done = 0, None, (0.0, 0), False

        async def guarded():
            nonlocal seen, start, window, done
            if done:
                return await receive()
            now = time.monotonic()
            if start is None:
                start, window = now, (now, 0)
            wait = min(self.read_timeout, start + self.body_deadline - now)
            with anyio.move_on_after(max(0.0, wait)) as waited:
                message = await receive()
            if waited.cancelled_caught:
                if wait < self.read_timeout:
                    raise HTTPException(408, f"the request body took over {self.body_deadline:g} s", CLOSE)
                raise HTTPException(408, f"no part of the request body came for {self.read_timeout:g} s", CLOSE)
            done = not message.get("more_body")
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, too_large, CLOSE)  # answered by the app's handler
            now = time.monotonic()
            since, seen_then = window
            if not done and now - since > self.read_timeout:  # each window must bring its share
                rate = (seen - seen_then) / (now - since)
                if rate < MIN_BODY_RATE:
                    raise HTTPException(408, f"the request body is coming too slowly ({rate:.0f} B/s; "
                                             f"send at least {_size(MIN_BODY_RATE)}/s)", CLOSE)
                window = (now, seen)
            return message

        await self.app(scope, guarded, send)


def head_bytes(scope) -> int:
    """The request line and headers' size, about as sent."""
    return (len(scope["method"]) + len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + 12
            + sum(len(k) + len(v) + 4 for k, v in scope["headers"]))


def _size(n: int) -> str:
    return f"{n / (1 << 20):g} MB" if n >= 1 << 20 else f"{n / 1024:g} KiB"


class CancelOnDisconnect:
    """Once the request body is read, watch the connection: a client that goes away cancels its
    request (the service then drops it from the queue, or stops it before its next model call)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body_read = anyio.Event()

        async def tracked():
            message = await receive()
            if not message.get("more_body"):
                body_read.set()
            return message

        async with anyio.create_task_group() as group:
            async def watch():
                await body_read.wait()
                while (await receive())["type"] != "http.disconnect":
                    pass
                group.cancel_scope.cancel()

            group.start_soon(watch)
            await self.app(scope, tracked, send)
            group.cancel_scope.cancel()


class ApiKey:
    """Authorization: Bearer KEY (the scheme in any case), compared in constant time, on every
    path but OPEN_PATHS, the files of `static_dir` (the page, which sends the key from its URL's
    #key=...) and CORS preflights (sent without credentials): a route added later is closed.
    HTTP Basic auth with KEY as the password (any user name) is taken too: Label Studio's
    ML-backend connection sends only that."""

    def __init__(self, app, key: str, static_dir: Path | None):
        self.app, self.key, self.static_dir = app, key.encode(), static_dir

    def _open(self, path: str) -> bool:
        if path in OPEN_PATHS:
            return True
        if self.static_dir is None:
            return False
        name = os.path.normpath(path.lstrip("/") or "index.html")
        try:
            return not name.startswith("..") and (Path(self.static_dir) / name).is_file()
        except (OSError, ValueError):  # a name too long for the file system, a NUL: no such file
            return False

    def _authorized(self, header: bytes) -> bool:
        scheme, _, given = header.strip().partition(b" ")
        scheme, given = scheme.lower(), given.strip()
        if scheme == b"basic":  # base64 of USER:KEY, any user name
            try:
                given = base64.b64decode(given, validate=True).partition(b":")[2]
            except binascii.Error:
                return False
        return scheme in (b"bearer", b"basic") and hmac.compare_digest(given, self.key)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and not self._open(scope["path"]):
            if not self._authorized(dict(scope["headers"]).get(b"authorization", b"")):
                response = _json_response(401, "missing or wrong API key: send Authorization: Bearer KEY",
                                          {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class Observe:
    """Request count and latency per route template, and the cross-origin isolation headers
    (COOP/COEP) that multithreaded WebAssembly in the browser client needs. Also: HEAD is
    answered as GET (the server sends no body), and a request still running when a graceful
    shutdown runs out of time gets a JSON 503 rather than uvicorn's plain-text 500 and traceback.
    Status 499 (nginx's "client closed request"): the client went away before an answer."""

    HEADERS = [(b"cross-origin-opener-policy", b"same-origin"), (b"cross-origin-embedder-policy", b"require-corp")]

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 499
        if scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        if scope["method"] == "POST" and not any(k == b"content-type" for k, _ in scope["headers"]):
            scope = {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}  # as documented

        async def send_with_headers(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *self.HEADERS]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except asyncio.CancelledError:  # uvicorn cancels what is left when a graceful shutdown times out
            if status == 499:
                await _json_response(503, "the server is shutting down; retry the request", CLOSE)(
                    scope, receive, send_with_headers)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe_request(scope["method"], route, status, time.perf_counter() - start)


class Cors(CORSMiddleware):
    """Starlette's CORS, with its refusals as JSON errors like every other."""

    def preflight_response(self, request_headers):
        response = super().preflight_response(request_headers)
        if response.status_code >= 400:
            return _json_response(response.status_code, f"cross-origin request refused: {response.body.decode()}")
        return response


async def _value(result):
    return await result if inspect.isawaitable(result) else result


# -- the app ---------------------------------------------------------------------------------
def normalize_origin(origin: str) -> str:
    """An --allow-origin value as browsers send Origin: scheme://host[:port], without a slash."""
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") or parts.query:
        raise UserError(f"--allow-origin {origin!r} is not an origin: give scheme://host[:port], e.g. "
                        "https://annotate.example")
    return f"{parts.scheme}://{parts.netloc}".lower()


def create_app(service, *, api_key: str | None = None, allow_origins=(), max_body_mb: float = 50,
               read_timeout: float = 10, body_deadline: float = 120, max_uploads: int = 8,
               static_dir: Path | None = WEB_DIR, label_studio=None) -> FastAPI:
    """The API v1 app over `service`. Upload bodies held at once (received or waiting to be
    encoded) total at most `max_uploads` x `max_body_mb`, one client's at most a quarter of that
    (or one body) (503 + Retry-After beyond): a byte budget (limits.UploadBudget, shared with
    Label Studio's image fetches). static_dir (default:
    ois_deploy/web, the browser client) is mounted at / after the API routes when it exists;
    None mounts nothing. label_studio (LabelStudioOptions) adds Label Studio's ML-backend routes
    under /label-studio."""
    if api_key is not None and not api_key.strip():
        raise UserError("the API key is empty: give a key, or none to serve without one")
    allow_origins = [normalize_origin(o) for o in allow_origins]
    info = service.model_info()
    max_clicks = DEFAULT_MAX_CLICKS if inspect.isawaitable(info) else info["max_clicks"]
    if inspect.iscoroutine(info):
        info.close()
    max_body = int(max_body_mb * (1 << 20))
    uploads = UploadBudget(max_uploads * max_body, max(max_body, max_uploads * max_body // 4))
    metrics = Metrics()
    # No slash redirects: Starlette builds their Location from the Host header.
    app = FastAPI(title="ois-deploy", version=__version__, summary="Interactive segmentation: embed once, click many.",
                  redirect_slashes=False)
    app.state.service, app.state.metrics, app.state.uploads = service, metrics, uploads
    protected = _errors(401) if api_key else {}

    @app.post("/v1/images", response_model=ImageInfo, tags=["v1"],
              responses={**_errors(400, 408, 413, 503), **protected},
              openapi_extra={"requestBody": {"required": True, "description": "The image file's bytes (PNG, JPEG, "
                                             "BMP, TIFF, WebP).", "content": {"application/octet-stream": BINARY}}})
    async def post_image(request: Request):
        """Encode an image (once per content); returns its id."""
        data = bytearray()
        with uploads.holding(client_of(request)) as held:  # held in memory until encoded: the byte budget
            async for chunk in request.stream():
                held.take(len(chunk))
                data += chunk
            info = await service.add_image(bytes(data))
        if not info["cached"]:
            metrics.observe_encoder(info["encoder_ms"] / 1000)
        return info

    async def post_masks(body, image_id: str = IMAGE_ID):
        """The mask for the whole click sequence so far."""
        clicks = [(c.x, c.y, c.positive) for c in body.clicks]
        result = await service.masks(image_id, clicks, body.format)
        metrics.observe_decoder(result["decoder_ms"] / 1000)
        return JSONResponse(result)  # as MaskResponse says; not re-validated (RLE counts are long lists)

    post_masks.__annotations__["body"] = masks_request(max_clicks)  # built here: FastAPI reads it from the signature
    app.post("/v1/images/{image_id}/masks", response_model=MaskResponse, tags=["v1"],
             responses={**_errors(400, 404, 408, 413, 415, 422, 503), **protected})(post_masks)

    @app.get("/v1/images/{image_id}/state", tags=["v1"], response_class=Response,
             responses={200: {"content": {"application/octet-stream": BINARY},
                              "description": "The encoder outputs as safetensors (metadata: width, height, input_size)."},
                        **_errors(404, 422, 503), **protected})
    async def get_state(image_id: str = IMAGE_ID):
        """The image's encoder state, for clients that run the decoder themselves."""
        data = await service.state(image_id)
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{image_id}.safetensors"'})

    @app.delete("/v1/images/{image_id}", status_code=204, response_class=Response, tags=["v1"],
                responses={**_errors(404, 422), **protected})
    async def delete_image(image_id: str = IMAGE_ID):
        """Forget an image and its state."""
        await service.delete(image_id)
        return Response(status_code=204)

    @app.get("/v1/model", response_model=ModelInfo, tags=["v1"], responses=protected)
    async def get_model():
        """The export's manifest and the URLs of its decoder graphs."""
        return await _value(service.model_info())

    @app.get("/v1/model/{file}", tags=["v1"], response_class=Response,
             responses={200: {"content": {"application/octet-stream": BINARY}, "description": "A decoder graph."},
                        **_errors(404), **protected})
    async def get_model_file(file: str):
        """A decoder graph listed in /v1/model (no other file is served)."""
        return Response(await service.model_file(file), media_type="application/octet-stream")

    @app.get("/healthz", response_model=Health, tags=["ops"])
    async def healthz():
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Ready, tags=["ops"], responses=_errors(503))
    async def readyz():
        """The graphs are loaded and requests are served."""
        if not await _value(service.ready()):
            return _json_response(503, "not ready: the model is not loaded")
        return {"ready": True}

    @app.get("/metrics", tags=["ops"], response_class=Response, responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format."},
        **protected})
    async def get_metrics():
        """Prometheus metrics."""
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(await _value(service.stats())), media_type=CONTENT_TYPE_LATEST)

    _error_handlers(app)
    # The last added is the outermost: Observe sees every response, CORS answers preflights
    # before the key is checked, the key before the body is read.
    limits = {("POST", "/v1/images"): max_body,
              ("POST", "/label-studio/predict"): LABEL_STUDIO_TASK_BYTES}  # a task carries its earlier annotations
    app.add_middleware(BodyGuard, limits=limits, read_timeout=read_timeout, body_deadline=body_deadline)
    app.add_middleware(CancelOnDisconnect)  # outside BodyGuard: its watch waits without the body's timeout
    if api_key:
        app.add_middleware(ApiKey, key=api_key, static_dir=static_dir)
    app.add_middleware(Cors, allow_origins=allow_origins, allow_methods=["GET", "POST", "DELETE"],
                       allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(Observe, metrics=metrics)
    if label_studio is not None:
        from .label_studio import PREFIX, label_studio_router

        app.include_router(label_studio_router(service, label_studio, uploads=uploads, metrics=metrics), prefix=PREFIX)
    if static_dir is not None:
        mount_static(app, static_dir)
    return app


def mount_static(app: FastAPI, directory: Path) -> None:
    """Serve `directory` at / (index.html for /), behind the API routes: the browser client's
    hook (create_app mounts ois_deploy/web/ when it exists). A GET/HEAD catch-all route rather
    than a Mount, so that a wrong method on an API path still gets that route's 405 and Allow."""
    if not Path(directory).is_dir():
        return
    files = StaticFiles(directory=directory, html=True)  # refuses paths outside the directory
    demo = Path(__file__).resolve().parents[1] / "assets" / "demo.png"  # the page's "Demo image" button
    app.router.add_route("/demo.png", lambda request: FileResponse(demo, media_type="image/png"),
                         methods=["GET", "HEAD"], include_in_schema=False)

    async def web(request: Request):
        for route in app.routes:  # an API path with another method: 405, as without this route
            if route is not web_route and route.matches(request.scope)[0] == Match.PARTIAL:
                methods = getattr(route, "methods", None) or ()
                raise HTTPException(405, headers={"Allow": ", ".join(sorted(methods))} if methods else None)
        path = os.path.normpath(os.path.join(*request.path_params["path"].split("/")))
        response = await files.get_response(path, request.scope)
        if "location" in response.headers:  # a folder's slash redirect: to that folder here, never off-site
            response.headers["location"] = "/" if path == "." else f"/{path.lstrip('/')}/"
        return RangeErrorsAsJson(response)

    app.router.add_route("/{path:path}", web, methods=["GET", "HEAD"], name="web", include_in_schema=False)
    web_route = app.router.routes[-1]


class RangeErrorsAsJson:
    """A static file's response, its refusals of a Range header (Starlette's plain-text 400 and
    bodiless 416) sent as JSON errors like every other."""

    def __init__(self, response):
        self.response = response

    async def __call__(self, scope, receive, send):
        refused = None

        async def send_json(message):
            nonlocal refused
            if message["type"] == "http.response.start" and message["status"] in (400, 416):
                refused = message
            elif refused is None:
                await send(message)
            elif not message.get("more_body"):
                status = refused["status"]
                headers = {k.decode(): v.decode() for k, v in refused["headers"] if k == b"content-range"}
                text = message.get("body", b"").decode(errors="replace").strip()
                error = (f"the Range is outside the file ({headers.get('content-range', '')})" if status == 416
                         else f"bad Range header: {text or 'malformed'}")
                await _json_response(status, error, headers)(scope, receive, send)

        await self.response(scope, receive, send_json)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return _json_response(exc.status, exc.message, {"Retry-After": "1"} if exc.status == 503 else None)

    @app.exception_handler(UserError)
    async def user_error(request, exc: UserError):
        return _json_response(400, str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return _json_response(exc.status_code, exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return _json_response(400, f"malformed JSON: {first.get('ctx', {}).get('error', 'cannot parse the body')}")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind and kind != "application/json" and not kind.endswith("+json") and first.get("loc") == ("body",):
            return _json_response(415, f"the body must be JSON, sent with Content-Type: application/json (got {kind})")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return _json_response(422, f"{where}: {first.get('msg', 'invalid')}{more}")

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request, exc: ClientDisconnect):  # mid-upload; nobody reads the answer
        return _json_response(400, "the client disconnected before the body was complete")

    @app.exception_handler(Exception)
    async def server_fault(request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _json_response(500, "internal server error (logged on the server)")
