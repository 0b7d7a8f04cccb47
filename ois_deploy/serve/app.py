"""The HTTP API v1 (docs/serving.md) over a SegmentationService, on FastAPI.

Every v1 route awaits only the service's methods (add_image, masks, state, delete, model_file,
stats, model_info, ready), so any object with the same methods gets the same API. Errors of every
kind leave as a 4xx with {"error": "one line"}; an unexpected exception is logged and answered
with a 500 without its traceback.
"""

from __future__ import annotations

import hmac
import inspect
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal, Union

from fastapi import FastAPI, Path as PathParam, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.staticfiles import StaticFiles

from .. import __version__
from ..errors import UserError
from .label_studio import basic_auth_matches
from .metrics import Metrics
from .service import ApiError

log = logging.getLogger("ois_deploy.serve")

WEB_DIR = Path(__file__).resolve().parents[1] / "web"  # the browser client, mounted at / when present
OPEN_PATHS = ("/healthz", "/readyz")  # no API key needed
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


class MasksRequest(BaseModel):
    clicks: list[Click] = Field(min_length=1, description="The whole click sequence so far, in order.")
    format: Literal["rle", "png", "polygons"] = Field("rle", description="Encoding of the returned mask.")


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
    text = {400: "Bad request", 401: "Missing or wrong API key", 404: "Not found", 413: "Too large",
            422: "Invalid request body or parameters", 503: "Not ready"}
    return {code: {"model": ErrorBody, "description": text[code]} for code in codes}


BINARY = {"schema": {"type": "string", "format": "binary"}}


# -- middleware (pure ASGI: no buffering of bodies) ------------------------------------------
def _json_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status, headers=headers)


class BodyLimit:
    """413 for a body over the limit: from Content-Length before reading, or while streaming."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"the request body is over this server's limit of {self.max_bytes / (1 << 20):g} MB"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _json_response(413, too_large)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, too_large)  # answered by the app's handler
            return message

        await self.app(scope, limited, send)


class ApiKey:
    """Authorization: Bearer KEY on every route but the open ones (and CORS preflights, which
    browsers send without credentials), compared in constant time. HTTP Basic auth with KEY as
    the password (any user name) is taken too: Label Studio's ML-backend connection sends only that."""

    def __init__(self, app, key: str):
        self.app, self.key, self.password = app, f"Bearer {key}".encode(), key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not (hmac.compare_digest(given, self.key) or basic_auth_matches(given, self.password)):
                response = _json_response(401, "missing or wrong API key: send Authorization: Bearer KEY",
                                          {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class Observe:
    """Request count and latency per route template, and the cross-origin isolation headers
    (COOP/COEP) that multithreaded WebAssembly in the browser client needs."""

    HEADERS = [(b"cross-origin-opener-policy", b"same-origin"), (b"cross-origin-embedder-policy", b"require-corp")]

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_with_headers(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *self.HEADERS]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
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
def create_app(service, *, api_key: str | None = None, allow_origins=(), max_body_mb: float = 50,
               static_dir: Path | None = WEB_DIR, label_studio=None) -> FastAPI:
    """The API v1 app over `service`. static_dir (default: ois_deploy/web, the browser client)
    is mounted at / after the API routes when it exists; None mounts nothing. label_studio
    (LabelStudioOptions) adds Label Studio's ML-backend routes under /label-studio."""
    metrics = Metrics()
    app = FastAPI(title="ois-deploy", version=__version__, summary="Interactive segmentation: embed once, click many.")
    app.state.service, app.state.metrics = service, metrics
    protected = _errors(401) if api_key else {}

    @app.post("/v1/images", response_model=ImageInfo, tags=["v1"], responses={**_errors(400, 413), **protected},
              openapi_extra={"requestBody": {"required": True, "description": "The image file's bytes (PNG, JPEG, "
                                             "BMP, TIFF, WebP).", "content": {"application/octet-stream": BINARY}}})
    async def post_image(request: Request):
        """Encode an image (once per content); returns its id."""
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
        info = await service.add_image(bytes(data))
        if not info["cached"]:
            metrics.encoder.observe(info["encoder_ms"] / 1000)
        return info

    @app.post("/v1/images/{image_id}/masks", response_model=MaskResponse, tags=["v1"],
              responses={**_errors(400, 404, 422), **protected})
    async def post_masks(body: MasksRequest, image_id: str = IMAGE_ID):
        """The mask for the whole click sequence so far."""
        clicks = [(c.x, c.y, c.positive) for c in body.clicks]
        result = await service.masks(image_id, clicks, body.format)
        metrics.decoder.observe(result["decoder_ms"] / 1000)
        return JSONResponse(result)  # as MaskResponse says; not re-validated (RLE counts are long lists)

    @app.get("/v1/images/{image_id}/state", tags=["v1"], response_class=Response,
             responses={200: {"content": {"application/octet-stream": BINARY},
                              "description": "The encoder outputs as safetensors (metadata: width, height, input_size)."},
                        **_errors(404, 422), **protected})
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
    app.add_middleware(BodyLimit, max_bytes=int(max_body_mb * (1 << 20)))
    if api_key:
        app.add_middleware(ApiKey, key=api_key)
    app.add_middleware(Cors, allow_origins=list(allow_origins), allow_methods=["GET", "POST", "DELETE"],
                       allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(Observe, metrics=metrics)
    if label_studio is not None:
        from .label_studio import PREFIX, label_studio_router

        app.include_router(label_studio_router(service, label_studio), prefix=PREFIX)
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
            if route.name != "web" and getattr(route, "methods", None) and route.path_regex.match(request.url.path):
                raise HTTPException(405, headers={"Allow": ", ".join(sorted(route.methods))})
        path = os.path.normpath(os.path.join(*request.path_params["path"].split("/")))
        return await files.get_response(path, request.scope)

    app.router.add_route("/{path:path}", web, methods=["GET", "HEAD"], name="web", include_in_schema=False)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return _json_response(exc.status, exc.message)

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
