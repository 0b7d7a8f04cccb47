"""Label Studio's ML-backend protocol (docs/label-studio.md) over the SegmentationService.

Label Studio posts the task and the annotator's smart key points so far (`context.result`: x, y
in percent of the image, `is_positive`) to /predict; the answer is one `brushlabels` region in
Label Studio's own brush RLE, made by its converter (label-studio-converter's `brush` module).

Task images are located as Label Studio's ML SDK locates them (label_studio_sdk's
`get_local_path`): uploads and local-files storage on the Label Studio host, cloud storage
URIs (s3://, gs://, azure-blob://) through the task's /tasks/<id>/resolve/ route; the API token
goes with those routes only (and only for the posting task's project), never to another path.
Other URLs must be on the allow-list (scheme, host and port). The SDK's downloader itself is not
used: it caches by URL forever and reads bodies unbounded, the two faults this module avoids.
Fetches are bounded (fetch.py) and counted in the server's upload byte budget; each request
fetches the image again (a conditional GET when the host gave an ETag), and the service keys
images by the SHA-256 of their bytes, so a changed file is a new image and an unchanged one a
cache hit. A held image whose size disagrees with the task's original_width/original_height is
never answered.

Each request is logged in one line (task, points, status, ms, and the reason of a refusal); the
token never is. A refusal is a 4xx {"error": "one line"}. Label Studio (1.23) shows only the
status line and URL of a backend's error, not its body: for Label Studio's own client
(User-Agent heartex/...) a refusal is first redirected (307) to the same route with the reason
in `?error=`, which that route answers with the 4xx, so the reason is in what Label Studio shows.
"""

from __future__ import annotations

import base64
import logging
import math
import re
import sys
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from urllib.parse import parse_qs, quote_plus, unquote, urlencode, urljoin, urlsplit

import anyio.to_thread
import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse

from .fetch import MAX_URL_CHARS, Fetcher, UpstreamError, origin_of, parse_origin, shown
from .masks import rle_decode
from .service import ApiError

PREFIX = "/label-studio"
MAX_KNOWN_URLS = 4096  # image URL -> (ETag, image): URLs of at most 4096 characters, ETags of 200: under 20 MB
CLOUD_SCHEMES = ("s3:", "gs:", "azure-blob:")  # as label_studio_sdk's is_cloud_storage_uri
log = logging.getLogger("ois_deploy.serve.label_studio")


@dataclass(frozen=True)
class LabelStudioOptions:
    url: str | None = None  # Label Studio's address: its file paths (/data/upload/...) are fetched there
    token: str | None = field(default=None, repr=False)  # its API token: legacy token or personal access token
    allow: tuple[tuple[str, str, int], ...] = ()  # (scheme, host, port) of external image URLs (no token sent)
    max_bytes: int = 50 << 20  # largest image file fetched
    deadline_s: float = 30.0  # a whole fetch, connection to last byte


def options_from_cli(url: str | None, token: str | None, allow_hosts: list[str], max_body_mb: float,
                     ray: bool, fetch_timeout: float = 30.0) -> LabelStudioOptions:
    """serve's --label-studio-* options, checked (UserError: one line, the token never in it)."""
    from ..errors import UserError

    if ray:
        raise UserError("--label-studio is not available with --ray: serve it from one process")
    try:
        import defusedxml, httpx, label_studio_converter  # noqa: F401,E401
    except ImportError as e:
        raise UserError(f"--label-studio needs the label-studio extra (pip install -e '.[cpu,label-studio]' in the "
                        f"repository): {e.name} is missing") from None
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserError(f"--label-studio-url must be an http(s) URL such as http://localhost:8080, got {url!r}")
    if token is not None and not token.strip():
        raise UserError("--label-studio-token (or LABEL_STUDIO_API_KEY) is empty")
    if token and not url:
        raise UserError("a Label Studio API token is given without --label-studio-url: where would it be sent?")
    allow = []
    for entry in allow_hosts:
        try:
            allow.append(parse_origin(entry))
        except ApiError as e:
            raise UserError(f"--label-studio-allow-host {entry[:100]!r}: {e.message}") from None
    return LabelStudioOptions(url, token.strip() if token else None, tuple(allow), int(max_body_mb * (1 << 20)),
                              fetch_timeout)


# -- the label config ------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """Where OIS writes: a BrushLabels tag on an Image, prompted by a smart KeyPointLabels."""

    from_name: str
    to_name: str
    data_key: str  # the task data field holding the image URL ($image -> image)
    labels: tuple[str, ...]


def _truthy(value) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def parse_label_config(config) -> Target:
    """The BrushLabels on an Image that a smart KeyPointLabels on the same Image prompts, every
    key-point label also a brush label (case-sensitive); 422 with the reason otherwise."""
    from defusedxml import ElementTree
    from defusedxml.common import DefusedXmlException

    if not isinstance(config, str) or not config.strip():
        raise ApiError(422, "the request has no label config: connect the backend to a project with a label config")
    try:
        root = ElementTree.fromstring(config)
    except (ElementTree.ParseError, DefusedXmlException, RecursionError) as e:
        raise ApiError(422, f"the label config is not valid XML: {str(e)[:200]}") from None
    tags = list(root.iter())
    images = {t.get("name"): t.get("value", "") for t in tags if t.tag.lower() == "image"}

    def labels_of(tag) -> tuple[str, ...]:
        return tuple(t.get("value") for t in tag.iter() if t.tag.lower() == "label" and t.get("value"))

    brushes = {t.get("toName"): t for t in tags if t.tag.lower() == "brushlabels" and
               images.get(t.get("toName"), "").startswith("$")}
    if not brushes:
        raise ApiError(422, "the label config has no BrushLabels on an Image with value=\"$field\": OIS answers with "
                            "brush masks (see the label config in docs/label-studio.md)")
    points = [t for t in tags if t.tag.lower() == "keypointlabels" and t.get("toName") in brushes]
    smart = [t for t in points if _truthy(t.get("smart")) or _truthy(t.get("smartOnly"))
             or any(_truthy(label.get("smart")) for label in t.iter() if label.tag.lower() == "label")]
    if not smart:
        raise ApiError(422, "the label config has no smart KeyPointLabels (smart=\"true\") on the BrushLabels' Image: "
                            "OIS segments from key points, Label Studio sends them only from a smart KeyPointLabels")
    tag = smart[0]
    brush = brushes[tag.get("toName")]
    missing = [label for label in labels_of(tag) if label not in labels_of(brush)]
    if missing or not labels_of(brush):
        raise ApiError(422, f"the KeyPointLabels' labels {', '.join(missing) or '(none)'} are not labels of BrushLabels "
                            f"{brush.get('name')!r} ({', '.join(labels_of(brush)) or 'none'}): give both tools the "
                            "same labels (case-sensitive)")
    return Target(brush.get("name"), tag.get("toName"), images[tag.get("toName")][1:], labels_of(brush))


# -- the key points --------------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    x: float  # percent of the image width
    y: float
    positive: bool
    label: str | None
    size: tuple[int, int] | None  # the image's (width, height) as the annotator's page has it


def _percent(value) -> float | None:
    """A JSON number in [0, 100], or None (huge integers overflow float: also None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) and 0 <= value <= 100 else None


def _size(item: dict) -> tuple[int, int] | None:
    w, h = item.get("original_width"), item.get("original_height")
    ok = all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 1 << 20 for v in (w, h))
    return (w, h) if ok else None


def key_points(context, target: Target) -> list[Point]:
    """The annotator's key points on the target image, in order; [] without any."""
    items = context.get("result") if isinstance(context, dict) else None
    if not isinstance(items, list):
        return []
    points = []
    for item in items:
        if not isinstance(item, dict) or item.get("to_name", target.to_name) != target.to_name:
            continue
        kind, value = item.get("type"), item.get("value")
        if kind == "rectanglelabels":
            raise ApiError(400, "rectangle prompts are not supported: OIS segments from clicks, place key points "
                                "(KeyPointLabels) instead")
        if kind != "keypointlabels":
            continue  # other regions (earlier masks, choices) are not prompts
        if not isinstance(value, dict):
            raise ApiError(400, "a key point has no value")
        x, y = _percent(value.get("x")), _percent(value.get("y"))
        if x is None or y is None:
            raise ApiError(400, f"key point coordinates must be percentages in [0, 100], got "
                                f"x={str(value.get('x'))[:20]}, y={str(value.get('y'))[:20]}")
        labels = value.get("keypointlabels") or []
        label = labels[0] if isinstance(labels, list) and labels and isinstance(labels[0], str) else None
        # Label Studio's front end always sends is_positive (Alt-click: false); absent means a plain click.
        points.append(Point(x, y, item.get("is_positive", True) is not False, label, _size(item)))
    return points


def to_pixels(point: Point, width: int, height: int) -> tuple[float, float, bool]:
    """Percent of the image -> a click in pixels (an edge at 100% stays inside the image)."""
    x = min(point.x * width / 100, math.nextafter(width, 0))
    y = min(point.y * height / 100, math.nextafter(height, 0))
    return x, y, point.positive


def brush_rle(mask: np.ndarray) -> list[int]:
    """bool [H,W] -> Label Studio's brush RLE (RGBA, 255 on the mask), by its own converter."""
    from label_studio_converter import brush

    return brush.mask2rle(np.asarray(mask, np.uint8) * 255)


# -- where a task's image is -----------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    id: int
    project: int | None
    image: str  # the URL or storage URI in the task's data


@dataclass(frozen=True)
class Location:
    url: str  # absolute
    token: bool  # a Label Studio file route: send the API token
    follow_once: bool  # Label Studio's resolve route may redirect to a presigned URL


def _file_route_of(path: str, query: dict) -> tuple[str, int | None] | None:
    """Which of Label Studio's file routes (label_studio_sdk get_local_path's cases) a path is, and
    the project or task it names: ("project" | "task" | "local", id), or None for any other path."""
    if match := re.match(r"/data/upload/(\d+)/[^/]", path):
        return "project", int(match[1])
    if path == "/storage-data/uploaded/":  # ?filepath=upload/<project>/<file>
        match = re.match(r"upload/(\d+)/", (query.get("filepath") or [""])[-1])
        return ("project", int(match[1])) if match else None
    if path == "/data/local-files/":  # ?d=<path>: Label Studio checks it against its local files storages
        return "local", None
    if match := re.match(r"/(tasks|projects)/(\d+)/(?:resolve|presign)/$", path):
        return match[1][:-1], int(match[2])
    return None


def locate(task: Task, options: LabelStudioOptions) -> Location:
    """Where the task's image is fetched from, and whether the token goes with it (4xx if nowhere)."""
    url, base = task.image, options.url
    if url.startswith(CLOUD_SCHEMES):  # Label Studio resolves storage URIs for the task (redirect or proxy)
        if not base:
            raise ApiError(400, "the task's image is a cloud storage URI: start serve with --label-studio-url and "
                                "its API token, Label Studio resolves it")
        fileuri = base64.urlsafe_b64encode(url.encode()).decode()
        return Location(f"{base.rstrip('/')}/tasks/{task.id}/resolve/?{urlencode({'fileuri': fileuri})}", True, True)
    if url.startswith("/") and not url.startswith("//"):
        if not base:
            raise ApiError(400, f"the task's image {shown('http://x' + url)[8:]} is a file on the Label Studio host: "
                                "start serve with --label-studio-url (and its API token)")
        url = urljoin(base.rstrip("/") + "/", url.lstrip("/"))
    where = origin_of(url)
    if base and where == origin_of(base):
        return Location(url, _file_route(url, task), False)
    if where not in options.allow:
        raise ApiError(403, f"the image origin {where[0]}://{where[1]}:{where[2]} is not allowed: add it with "
                            "--label-studio-allow-host")
    return Location(url, False, False)


def _file_route(url: str, task: Task) -> bool:
    """True for Label Studio's file routes of the task's own project or task; 403 for any other
    path on its host (the token would reach its API), 400 for a path not normalised."""
    parts = urlsplit(url)
    path, query = unquote(parts.path), parse_qs(parts.query)
    local = (query.get("d") or [""])[-1]
    if any(segment in ("", ".", "..") for segment in path.split("/")[1:-1]) or ".." in local.split("/"):
        raise ApiError(400, "the image path on the Label Studio host is not normalised ('.', '..' or '//')")
    route = _file_route_of(path, query)
    if route is None:
        raise ApiError(403, f"{shown(url)} is not a Label Studio file path (/data/upload/, /data/local-files/, "
                            "/tasks/<id>/resolve/): the backend does not send its token there")
    kind, named = route
    if kind == "project" and named != task.project:
        raise ApiError(403, f"the image belongs to Label Studio project {named}, not to the task's project "
                            f"{task.project}")
    if kind == "task" and named != task.id:
        raise ApiError(403, f"the image is resolved for task {named}, not for the task {task.id} asked about")
    return True


class ImageSource:
    """Task images into the service's cache, keyed by content: each request fetches again (a
    conditional GET when the host gave an ETag) and the service hashes what it gets."""

    def __init__(self, service, options: LabelStudioOptions, metrics):
        self.service, self.options, self.metrics = service, options, metrics
        self.fetcher = Fetcher(options.max_bytes, options.deadline_s)
        self.known: OrderedDict[str, tuple[str, dict]] = OrderedDict()  # URL -> (ETag, add_image's answer)
        self._access: str | None = None  # access token from a personal access token (refreshed on 401)

    async def image(self, task: Task, uploads, client: str, size: tuple[int, int] | None, fresh: bool = False) -> dict:
        """The task's image in the service's cache (add_image's answer). Its size must be
        `size` (the annotator's page's): one fetch without validators, then 409."""
        where = locate(task, self.options)
        info = await self._load(where, uploads, client, fresh)
        if size and (info["width"], info["height"]) != size and not fresh:
            info = await self._load(where, uploads, client, True)
        if size and (info["width"], info["height"]) != size:
            raise ApiError(409, f"the image behind the task's URL is {info['width']}x{info['height']}, the annotator's "
                                f"page has {size[0]}x{size[1]}: the file was replaced; reload the task")
        return info

    async def _load(self, where: Location, uploads, client: str, fresh: bool) -> dict:
        known = None if fresh else self.known.get(where.url)
        with uploads.holding(client) as held:
            etag = known[0] if known else None
            try:
                fetched = await self.fetcher.get(where.url, held, await self._auth(where), etag, where.follow_once)
            except UpstreamError as e:
                if e.upstream != 401 or self._access is None:
                    raise
                self._access = None  # an expired access token: exchange the personal access token again
                fetched = await self.fetcher.get(where.url, held, await self._auth(where), etag, where.follow_once)
            if fetched.data is None and known:
                self.known.move_to_end(where.url)
                return known[1]
            if fetched.data is None:  # a 304 we did not ask for
                raise ApiError(400, f"the image host answered 304 to {shown(where.url)} without a validator")
            info = await self.service.add_image(fetched.data)
        if not info["cached"]:
            self.metrics.observe_encoder(info["encoder_ms"] / 1000, api="label-studio")
        if fetched.etag and len(fetched.etag) <= 200:
            self.known[where.url] = (fetched.etag, info)
            while len(self.known) > MAX_KNOWN_URLS:
                self.known.popitem(last=False)
        else:
            self.known.pop(where.url, None)
        return info

    async def _auth(self, where: Location) -> dict:
        """Label Studio's auth header for its file routes: a legacy token as is, a personal access
        token (a JWT refresh token) exchanged for an access token at /api/token/refresh."""
        import httpx

        token = self.options.token
        if not token or not where.token:
            return {}
        if token.count(".") != 2:
            return {"Authorization": f"Token {token}"}
        if self._access is None:
            try:
                async with httpx.AsyncClient(trust_env=False, timeout=self.options.deadline_s) as client:
                    response = await client.post(urljoin(self.options.url.rstrip("/") + "/", "api/token/refresh/"),
                                                 json={"refresh": token})
                access = response.json().get("access") if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError, AttributeError):
                access = None
            if not isinstance(access, str):
                raise ApiError(400, "Label Studio refused the personal access token (or did not answer)")
            self._access = access
        return {"Authorization": f"Bearer {self._access}"}


# -- the routes ------------------------------------------------------------------------------
def _logger() -> logging.Logger:
    """This module's log lines on stderr (uvicorn's own logging is quiet: log_level warning)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s label-studio %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def _refusal(request: Request, error: ApiError) -> JSONResponse | RedirectResponse:
    """The 4xx {"error"}; for Label Studio's own client first a 307 to ?error=REASON (see the module's doc)."""
    from_label_studio = request.headers.get("user-agent", "").startswith("heartex/")
    if from_label_studio and "error" not in request.query_params and error.status < 500:
        query = urlencode({"status": error.status, "error": error.message[:400]}, safe="'(),:/\"", quote_via=quote_plus)
        return RedirectResponse(f"{request.url.path}?{query}", 307)
    headers = {"Retry-After": "1"} if error.status == 503 else None
    return JSONResponse({"error": error.message}, error.status, headers=headers)


def _reported(request: Request) -> ApiError | None:
    """The refusal a 307 above carries back (Label Studio's client follows it)."""
    message, status = request.query_params.get("error"), request.query_params.get("status", "")
    if message is None:
        return None
    return ApiError(int(status) if status.isdigit() and 400 <= int(status) < 500 else 400, message)


async def _body_of(request: Request) -> dict:
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # RecursionError: deeply nested brackets
        raise ApiError(400, "malformed JSON body (or nested too deeply)") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _task_of(body: dict, data_key: str) -> Task:
    tasks = body.get("tasks")
    task = tasks[0] if isinstance(tasks, list) and len(tasks) == 1 and isinstance(tasks[0], dict) else None
    if task is None:
        raise ApiError(400, "an interactive prediction needs exactly one task")
    task_id = task.get("id")
    if isinstance(task_id, bool) or not isinstance(task_id, int) or not 0 <= task_id < 1 << 62:
        raise ApiError(400, "the task has no integer id")
    project = task.get("project")
    uid = body.get("project")  # Label Studio sends "<project id>.<created timestamp>"
    if not isinstance(project, int) and isinstance(uid, str) and uid.split(".")[0].isdigit():
        project = int(uid.split(".")[0][:18])
    image = task["data"].get(data_key) if isinstance(task.get("data"), dict) else None
    if not isinstance(image, str) or not image or len(image) > MAX_URL_CHARS:
        raise ApiError(400, f"the task has no image URL (of at most {MAX_URL_CHARS} characters) in data.{data_key}")
    return Task(task_id, project if isinstance(project, int) and not isinstance(project, bool) else None, image)


def label_studio_router(service, options: LabelStudioOptions, *, uploads, metrics) -> APIRouter:
    """/health, /setup, /predict (and /versions, /webhook) as Label Studio calls an ML backend.
    uploads: the server's upload byte budget (limits.UploadBudget), which fetches share;
    metrics: the app's Metrics, for the encoder and decoder histograms."""
    from .limits import client_of

    router = APIRouter(tags=["label-studio"])
    images = ImageSource(service, options, metrics)
    info = service.model_info()
    model_version = f"ois-{info['preset']}-{info['backend']}-{info['precision']}"
    logger = _logger()

    @router.get("/health")
    @router.get("/")
    async def health():
        """Label Studio's connection check."""
        return {"status": "UP", "model_class": "OIS", "model_version": model_version}

    @router.post("/setup")
    async def setup(request: Request):
        """Called when a project connects the backend: its label config must work (see parse_label_config)."""
        if (reported := _reported(request)) is not None:
            return _refusal(request, reported)  # logged when it was first refused
        start = time.perf_counter()
        try:
            parse_label_config((await _body_of(request)).get("schema"))
        except ApiError as e:
            logger.info("setup status=%d ms=%.0f refused: %s", e.status, (time.perf_counter() - start) * 1000,
                        e.message)
            return _refusal(request, e)
        logger.info("setup status=200 ms=%.0f", (time.perf_counter() - start) * 1000)
        return {"model_version": model_version}

    @router.get("/versions")
    async def versions():
        return {"versions": [model_version]}

    @router.post("/webhook")
    async def webhook():
        """Training events: OIS does not learn from annotations; acknowledged and ignored."""
        return {"status": "ignored: OIS is not trained from Label Studio"}

    @router.post("/predict")
    async def predict(request: Request):
        """One brush region for the task's key points; for tasks without key points (batch
        pre-annotation, opening a task) an empty prediction list per task."""
        if (reported := _reported(request)) is not None:
            return _refusal(request, reported)  # logged when it was first refused
        start, task_id, n_points = time.perf_counter(), None, 0
        try:
            body = await _body_of(request)
            tasks = body.get("tasks")
            target = parse_label_config(body.get("label_config"))
            params = body.get("params") if isinstance(body.get("params"), dict) else {}
            points = key_points(params.get("context"), target)
            n_points = len(points)
            if not points:  # one list per task, each empty: Label Studio stores no prediction and logs no error
                answer = {"results": [[] for _ in tasks] if isinstance(tasks, list) and tasks else [[]]}
                task_id = f"{len(tasks)} tasks" if isinstance(tasks, list) else None
            else:
                task = _task_of(body, target.data_key)
                task_id = task.id
                answer = await _predict(task, points, target, request)
        except ApiError as e:
            logger.info("predict task=%s points=%d status=%d ms=%.0f refused: %s", task_id, n_points, e.status,
                        (time.perf_counter() - start) * 1000, e.message)
            return _refusal(request, e)
        logger.info("predict task=%s points=%d status=200 ms=%.0f", task_id, n_points,
                    (time.perf_counter() - start) * 1000)
        return answer

    async def _predict(task: Task, points: list[Point], target: Target, request: Request) -> dict:
        label = points[-1].label  # the label the annotator has selected for the current key point
        if label is not None and label not in target.labels:
            raise ApiError(422, f"the key point's label {label!r} is not a label of BrushLabels {target.from_name!r} "
                                f"({', '.join(target.labels)}): give both tools the same labels")
        client, size = client_of(request), points[-1].size
        image = await images.image(task, uploads, client, size)
        try:
            answer = await _masks(service, image, points)
        except ApiError as e:
            if e.status != 404:
                raise
            image = await images.image(task, uploads, client, size, fresh=True)  # evicted since: fetch it again
            answer = await _masks(service, image, points)
        metrics.observe_decoder(answer["decoder_ms"] / 1000, api="label-studio")
        mask = rle_decode(answer["mask"])
        rle = await anyio.to_thread.run_sync(brush_rle, mask)
        region = {
            "id": uuid.uuid4().hex[:10], "from_name": target.from_name, "to_name": target.to_name,
            "type": "brushlabels", "origin": "prediction", "readonly": False,
            "original_width": image["width"], "original_height": image["height"], "image_rotation": 0,
            "value": {"format": "rle", "rle": rle, "brushlabels": [label] if label else []},
        }
        return {"results": [{"result": [region] if answer["area"] else [], "model_version": model_version}]}

    return router


async def _masks(service, image: dict, points: list[Point]) -> dict:
    clicks = [to_pixels(p, image["width"], image["height"]) for p in points]
    return await service.masks(image["image_id"], clicks, "rle")
