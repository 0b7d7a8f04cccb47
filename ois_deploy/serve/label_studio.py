"""Label Studio's ML-backend protocol (docs/label-studio.md) over the SegmentationService.

Label Studio posts the task and the annotator's smart key points so far (`context.result`: x, y
in percent of the image, `is_positive`) to /predict; the answer is one `brushlabels` region in
Label Studio's own brush RLE, made by its converter (label-studio-converter's `brush` module).
The image is fetched once per URL: a file on the Label Studio host with the project's API token,
or an external URL whose host is on the allow-list; its bytes go through the service's image
checks and pixel limit and into its cache, so every annotator of an image shares one encode.

Bad input gets a 4xx with {"error": "one line"} (Label Studio shows the status line), a request
without key points an empty prediction. The token is never logged nor put in a message.
"""

from __future__ import annotations

import math
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import anyio.to_thread
import numpy as np
from fastapi import APIRouter, Request

from .masks import rle_decode
from .service import ApiError

PREFIX = "/label-studio"
MAX_KNOWN_URLS = 4096  # image URL -> image id; an evicted or forgotten id is fetched again


@dataclass(frozen=True)
class LabelStudioOptions:
    url: str | None = None  # Label Studio's address: relative file URLs (/data/upload/...) are fetched there
    token: str | None = field(default=None, repr=False)  # its API token: legacy token or personal access token
    allow_hosts: tuple[str, ...] = ()  # hosts of external image URLs that may be fetched (no token sent)
    max_bytes: int = 50 << 20  # largest image file fetched
    timeout_s: float = 20.0


def options_from_cli(url: str | None, token: str | None, allow_hosts: list[str], max_body_mb: float,
                     ray: bool) -> LabelStudioOptions:
    """serve's --label-studio-* options, checked (UserError: one line, the token never in it)."""
    from ..errors import UserError

    if ray:
        raise UserError("--label-studio is not available with --ray: serve it from one process")
    try:
        import defusedxml, httpx, label_studio_converter  # noqa: F401,E401
    except ImportError as e:
        raise UserError(f"--label-studio needs the label-studio extra (pip install 'ois-deploy[label-studio]'): "
                        f"{e.name} is missing") from None
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserError(f"--label-studio-url must be an http(s) URL such as http://localhost:8080, got {url!r}")
    if token is not None and not token.strip():
        raise UserError("--label-studio-token (or LABEL_STUDIO_API_KEY) is empty")
    if token and not url:
        raise UserError("a Label Studio API token is given without --label-studio-url: where would it be sent?")
    return LabelStudioOptions(url, token.strip() if token else None, tuple(h.strip() for h in allow_hosts),
                              int(max_body_mb * (1 << 20)))


@dataclass(frozen=True)
class Target:
    """Where OIS writes: a BrushLabels tag on an Image, from the project's label config."""

    from_name: str
    to_name: str
    data_key: str  # the task data field holding the image URL ($image -> image)
    labels: tuple[str, ...]


def parse_label_config(config) -> Target:
    """The first BrushLabels on an Image in a label config (XML); 422 when there is none."""
    from defusedxml import ElementTree
    from defusedxml.common import DefusedXmlException

    if not isinstance(config, str) or not config.strip():
        raise ApiError(422, "the request has no label_config: connect the backend to a project with a label config")
    try:
        root = ElementTree.fromstring(config)
    except (ElementTree.ParseError, DefusedXmlException) as e:
        raise ApiError(422, f"the label config is not valid XML: {e}") from None
    tags = list(root.iter())
    images = {t.get("name"): t.get("value", "") for t in tags if t.tag.lower() == "image"}
    for tag in tags:
        to_name = tag.get("toName")
        if tag.tag.lower() == "brushlabels" and to_name in images and images[to_name].startswith("$"):
            labels = tuple(t.get("value") for t in tag.iter() if t.tag.lower() == "label" and t.get("value"))
            return Target(tag.get("name"), to_name, images[to_name][1:], labels)
    raise ApiError(422, "the label config has no BrushLabels on an Image with value=\"$field\": OIS answers with "
                        "brush masks (see the label config in docs/label-studio.md)")


@dataclass(frozen=True)
class Point:
    x: float  # percent of the image width
    y: float
    positive: bool
    label: str | None


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
        x, y = value.get("x"), value.get("y")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 100
                   for v in (x, y)):
            raise ApiError(400, f"key point coordinates must be percentages in [0, 100], got x={x!r}, y={y!r}")
        labels = value.get("keypointlabels") or []
        label = labels[0] if isinstance(labels, list) and labels and isinstance(labels[0], str) else None
        # Label Studio's front end always sends is_positive (Alt-click: false); absent means a plain click.
        points.append(Point(float(x), float(y), item.get("is_positive", True) is not False, label))
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


class ImageSource:
    """Fetches task images (Label Studio host with its token, or allow-listed hosts) into the
    service's cache, remembering each URL's image id."""

    def __init__(self, service, options: LabelStudioOptions):
        self.service, self.options = service, options
        self.ids: OrderedDict[str, dict] = OrderedDict()  # URL -> add_image's answer
        self._access: str | None = None  # access token from a personal access token (refreshed on 401)

    async def add(self, url: str, refresh: bool = False) -> dict:
        """The image at url in the service's cache: its add_image answer (id, width, height)."""
        if not refresh and url in self.ids:
            self.ids.move_to_end(url)
            return self.ids[url]
        info = await self.service.add_image(await self.fetch(url))
        self.ids[url] = info
        while len(self.ids) > MAX_KNOWN_URLS:
            self.ids.popitem(last=False)
        return info

    def resolve(self, url: str) -> tuple[str, bool]:
        """(absolute URL, whether it is on the Label Studio host and gets the token)."""
        base = self.options.url
        if url.startswith("/") and not url.startswith("//"):
            if not base:
                raise ApiError(400, f"the task's image {url} is a file on the Label Studio host: start serve with "
                                    "--label-studio-url (and its API token)")
            url = urljoin(base.rstrip("/") + "/", url.lstrip("/"))
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ApiError(400, f"the task's image must be an http(s) URL, got {_shown(url)!r}")
        if base and (parts.scheme, parts.netloc) == (urlsplit(base).scheme, urlsplit(base).netloc):
            return url, True
        if parts.hostname.lower() not in {h.lower() for h in self.options.allow_hosts}:
            raise ApiError(403, f"the image host {parts.hostname} is not allowed: add it with "
                                "--label-studio-allow-host")
        return url, False

    async def fetch(self, url: str) -> bytes:
        import httpx

        url, on_label_studio = self.resolve(url)
        try:
            async with httpx.AsyncClient(timeout=self.options.timeout_s, follow_redirects=False) as client:
                headers = await self._auth(client) if on_label_studio else {}
                response = await self._get(client, url, headers)
                expired = getattr(response, "status_code", None) == 401 and self._access is not None
                if expired and on_label_studio:
                    self._access = None  # an expired access token: refresh once
                    response = await self._get(client, url, await self._auth(client))
        except httpx.HTTPError as e:
            raise ApiError(400, f"cannot fetch the task's image {_shown(url)}: {type(e).__name__}") from None
        if isinstance(response, bytes):
            return response
        hint = " (is the Label Studio API token right?)" if response.status_code in (401, 403) else ""
        raise ApiError(400, f"cannot fetch the task's image {_shown(url)}: HTTP {response.status_code}{hint}")

    async def _get(self, client, url: str, headers: dict):
        """The body (bytes) of a 200, or the response of any other status; 413 past max_bytes."""
        async with client.stream("GET", url, headers=headers) as response:
            if response.status_code != 200:
                return response
            limit = self.options.max_bytes
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > limit:
                raise _too_large(limit)
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > limit:
                    raise _too_large(limit)
            return bytes(data)

    async def _auth(self, client) -> dict:
        """Label Studio's auth header: a legacy token as is, a personal access token (a JWT
        refresh token) exchanged for an access token at /api/token/refresh."""
        token = self.options.token
        if not token:
            return {}
        if token.count(".") != 2:
            return {"Authorization": f"Token {token}"}
        if self._access is None:
            response = await client.post(urljoin(self.options.url.rstrip("/") + "/", "api/token/refresh/"),
                                         json={"refresh": token})
            try:
                access = response.json().get("access") if response.status_code == 200 else None
            except ValueError:
                access = None
            if not isinstance(access, str):
                raise ApiError(400, f"Label Studio refused the personal access token (HTTP {response.status_code})")
            self._access = access
        return {"Authorization": f"Bearer {self._access}"}


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the task's image is over this server's limit of {limit / (1 << 20):g} MB")


def _shown(url: str) -> str:
    parts = urlsplit(url)  # no query string: signed URLs carry credentials there
    return f"{parts.scheme}://{parts.netloc}{parts.path}"[:200]


def label_studio_router(service, options: LabelStudioOptions) -> APIRouter:
    """/health, /setup, /predict (and /versions, /webhook) as Label Studio calls an ML backend."""
    router = APIRouter(tags=["label-studio"])
    images = ImageSource(service, options)
    info = service.model_info()
    model_version = f"ois-{info['preset']}-{info['backend']}-{info['precision']}"

    async def body_of(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "malformed JSON body") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    @router.get("/health")
    @router.get("/")
    async def health():
        """Label Studio's connection check."""
        return {"status": "UP", "model_class": "OIS", "model_version": model_version}

    @router.post("/setup")
    async def setup(request: Request):
        """Called when a project connects the backend: its label config must have a BrushLabels on an Image."""
        parse_label_config((await body_of(request)).get("schema"))
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
        """One brush region for the task's key points; no prediction without key points."""
        body = await body_of(request)
        target = parse_label_config(body.get("label_config"))
        params = body.get("params") if isinstance(body.get("params"), dict) else {}
        points = key_points(params.get("context"), target)
        if not points:
            return {"results": []}  # batch pre-annotation or nothing clicked yet: OIS needs clicks
        label = points[-1].label  # the label the annotator has selected for the current key point
        if label is not None and target.labels and label not in target.labels:
            raise ApiError(422, f"the key point's label {label!r} is not a label of BrushLabels {target.from_name!r} "
                                f"({', '.join(target.labels)}): give both tools the same labels")
        tasks = body.get("tasks")
        task = tasks[0] if isinstance(tasks, list) and len(tasks) == 1 and isinstance(tasks[0], dict) else None
        if task is None:
            raise ApiError(400, "an interactive prediction needs exactly one task")
        url = (task.get("data") or {}).get(target.data_key) if isinstance(task.get("data"), dict) else None
        if not isinstance(url, str) or not url:
            raise ApiError(400, f"the task has no image URL in data.{target.data_key}")
        image = await images.add(url)
        try:
            answer = await _masks(service, image, points)
        except ApiError as e:
            if e.status != 404:
                raise
            image = await images.add(url, refresh=True)  # evicted or deleted since: fetch it again
            answer = await _masks(service, image, points)
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
