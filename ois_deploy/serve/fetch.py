"""Fetching an image over HTTP(S) for the server, bounded like an upload (docs/label-studio.md).

A fetch holds at most `max_bytes` of body, counted in the server's shared upload byte budget
(the caller's `held`, from limits.UploadBudget) as it streams in; it must complete within one
total deadline (a trickling host cannot hold a request); it asks for `Accept-Encoding:
identity` and refuses any compressed response, so nothing is ever decompressed (a gzip bomb is
refused by its headers, before its first byte is read). Network I/O is asynchronous; no CPU work
runs on the event loop. Redirects are not followed unless the caller says so (one hop). The
environment (proxies, .netrc) is ignored: a credential is sent only where the caller puts it.

Every refusal is an ApiError (4xx) with a one-line reason; URLs in messages lose their query
string (signed URLs carry credentials there).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

import anyio

from .service import ApiError

MAX_URL_CHARS = 4096
DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an absolute http(s) URL; 400 for anything else, malformed URLs
    (control characters, unclosed brackets, bad ports) included."""
    if not isinstance(url, str) or len(url) > MAX_URL_CHARS:
        raise ApiError(400, f"the image URL must be a string of at most {MAX_URL_CHARS} characters")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise ApiError(400, "the image URL contains a space or a control character")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ApiError(400, f"the image URL is malformed: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ApiError(400, f"the image URL must be an absolute http(s) URL, got {shown(url)!r}")
    return scheme, parts.hostname.lower(), port or DEFAULT_PORTS[scheme]


def parse_origin(text: str) -> tuple[str, str, int]:
    """An allow-list entry: scheme://host[:port], or a bare host meaning https on port 443."""
    text = text.strip()
    return origin_of(text if "://" in text else f"https://{text}")


def shown(url: str) -> str:
    """A URL as it may be logged or put in a message: no query string, no user info, at most 200 characters."""
    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        return f"{parts.scheme}://{host}{parts.path}"[:200]
    except ValueError:
        return "(malformed URL)"


class UpstreamError(ApiError):
    """The image host answered with an error status (`upstream`): a 400 to our client."""

    def __init__(self, upstream: int, message: str):
        super().__init__(400, message)
        self.upstream = upstream


@dataclass(frozen=True)
class Fetched:
    data: bytes | None  # None: 304 Not Modified (the caller's etag still holds)
    etag: str | None


class Fetcher:
    def __init__(self, max_bytes: int, deadline_s: float):
        self.max_bytes, self.deadline_s = max_bytes, deadline_s

    async def get(self, url: str, held, headers: dict | None = None, etag: str | None = None,
                  follow_once: bool = False) -> Fetched:
        """GET url within the deadline; its body counted into `held` (held.take(n) raises 503
        when the server's budget is spent). follow_once: one redirect is followed, without
        `headers` (a credential is for the first host only)."""
        import httpx

        request_headers = {"Accept-Encoding": "identity", **(headers or {})}
        if etag:
            request_headers["If-None-Match"] = etag
        try:
            with anyio.fail_after(self.deadline_s):
                async with httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                             timeout=self.deadline_s) as client:
                    fetched = await self._get(client, url, request_headers, held)
                    if isinstance(fetched, str) and follow_once:
                        origin_of(fetched)  # the Location must be an absolute http(s) URL
                        fetched = await self._get(client, fetched, {"Accept-Encoding": "identity"}, held)
        except TimeoutError:
            raise ApiError(400, f"the image {shown(url)} did not arrive within {self.deadline_s:g} s") from None
        except httpx.HTTPError as e:
            raise ApiError(400, f"cannot fetch the image {shown(url)}: {type(e).__name__}") from None
        if isinstance(fetched, str):
            raise ApiError(400, f"the image {shown(url)} is a redirect, which is not followed")
        return fetched

    async def _get(self, client, url: str, headers: dict, held) -> Fetched | str:
        """The body of a 200, a 304 as Fetched(None), a redirect's Location; 4xx otherwise."""
        async with client.stream("GET", url, headers=headers) as response:
            status = response.status_code
            if status == 304:
                return Fetched(None, headers.get("If-None-Match"))
            if status in (301, 302, 303, 307, 308) and response.headers.get("location"):
                return str(response.url.join(response.headers["location"]))
            if status != 200:
                hint = " (is the Label Studio API token right?)" if status in (401, 403) else ""
                raise UpstreamError(status, f"cannot fetch the image {shown(url)}: HTTP {status}{hint}")
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise ApiError(415, f"the image host answered with Content-Encoding {encoding[:40]!r} although "
                                    "asked for identity: compressed responses are refused")
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > self.max_bytes:
                raise too_large(self.max_bytes)
            data = bytearray()
            async for chunk in response.aiter_raw():
                if len(data) + len(chunk) > self.max_bytes:
                    raise too_large(self.max_bytes)
                held.take(len(chunk))
                data += chunk
            return Fetched(bytes(data), response.headers.get("etag"))


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the image file is over this server's limit of {limit / (1 << 20):g} MB")
