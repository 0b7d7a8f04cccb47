"""The segmentation service behind the HTTP API, without any web framework.

Images are encoded once and kept by content hash in an LRU cache bounded in bytes; each mask
request sends the whole click sequence so far. The service keeps the fed-back probability of
recent prefixes of each image's click sequences, so a request that extends a known sequence by
one click costs one decode; any other sequence (a new session, an undo past the kept prefixes,
an entry re-posted after eviction) is replayed click by click from the empty mask. Either way the
decoder sees exactly the inputs `Predictor` gives it for the same clicks, so the masks are
identical (`decode_clicks` is the one code path).

All methods that run the model are async and do their work in a worker thread, so the event
loop is never blocked. Model requests (a decoded image and its activations, or a mask at the
image's size, each) wait for a slot in the event loop, holding no thread, in two lanes: requests
on images over LARGE_PIXELS get at most one slot per core but one, the others one per core of
their own, so that a flood of large images never holds up the small ones (cheap: their clicks
are not stuck behind a large image's); each lane admits at most `max_queue` waiting requests,
503 beyond (the app adds Retry-After). A request cancelled while it waits
never runs; one cancelled while it runs (its client went away) stops before its next model
call, and its slot is freed when its thread ends.

The HTTP app (app.py) calls only the async methods below; another object with the same methods
(a proxy to Ray Serve replicas) can stand in for this class.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import anyio.to_thread
import numpy as np

from ..contract import ENCODER_OUTPUTS, is_export_folder, read_manifest
from ..errors import UserError
from ..runtime.base import Runner
from ..runtime.predictor import Encoded, decode_clicks, empty_prev, encode_image
from ..runtime.preprocess import ImageTooLarge, decode_image, image_header
from .masks import FORMATS, encode_mask

log = logging.getLogger("ois_deploy.serve")

LARGE_PIXELS = 4_194_304  # 2048 x 2048: a larger image's requests take the large lane (see above)
BYTES_PER_PIXEL = 8  # a model request's peak working memory per image pixel (a 40 MP upload: 6, measured)
MAX_PREFIXES = 8  # fed-back masks kept per image: the current sequence's last prefixes (extend, undo)
Click = tuple[float, float, bool]


def working_memory_bound(slots: int, max_image_pixels: int) -> int:
    """Bytes the model requests running at once may hold: a large image per large-lane slot, a
    small one per small-lane slot (docs/serving.md, "Memory")."""
    return BYTES_PER_PIXEL * (max(1, slots - 1) * max_image_pixels + slots * LARGE_PIXELS)


def _lower_priority() -> None:
    """This thread at niceness +10 (Linux: a thread's own; raising it needs no privilege)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not allowed: the default priority
        pass


class _Abandoned(Exception):
    """Raised in a worker thread whose caller was cancelled: nobody waits for its result."""


class ApiError(Exception):
    """A request the service refuses: HTTP status and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = " ".join(str(message).split())


@dataclass
class _Entry:
    encoded: Encoded
    state_bytes: int
    prefixes: OrderedDict = field(default_factory=OrderedDict)  # tuple(clicks) -> prev [1,1,S,S]

    @property
    def nbytes(self) -> int:
        return self.state_bytes + sum(p.nbytes for p in self.prefixes.values())


def _state_nbytes(runner: Runner, state) -> int:
    tensors = state.values() if isinstance(state, dict) else state  # the torch-family runners' ImageState: a tuple
    sizes = [getattr(v, "nbytes", None) for v in tensors]
    if all(isinstance(s, int) for s in sizes):
        return sum(sizes)
    return sum(a.nbytes for a in runner.state_to_numpy(state).values())  # device tensors


class SegmentationService:
    def __init__(self, runner: Runner, cache_mb: float = 1024, max_image_pixels: int = 40_000_000,
                 export_dir: str | Path | None = None, max_queue: int = 32, slots: int | None = None):
        self.runner = runner
        self.cfg = runner.cfg
        self.max_clicks = self.cfg.decoder.max_clicks
        self.capacity = int(cache_mb * (1 << 20))
        self.max_image_pixels = int(max_image_pixels)
        export_dir = export_dir if export_dir is not None else getattr(runner, "export_dir", None)
        self.export_dir = Path(export_dir) if export_dir is not None and is_export_folder(export_dir) else None
        self.manifest = read_manifest(self.export_dir) if self.export_dir else None
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # guards the cache and the counters
        # ONNX Runtime sessions run concurrently from several threads; PyTorch models, and any
        # runner that says it is not thread-safe, run one call at a time.
        serial = not runner.thread_safe or runner.name.startswith("torch")
        self._run_lock = threading.Lock() if serial else nullcontext()
        # Model requests (upload: decode and encode; masks: the decodes and the mask at the image's
        # size) run at most this many at a time per lane: a burst waits instead of holding that
        # many images' worth of memory at once (the bound of docs/serving.md, "Memory").
        self.slots = max(1, slots or os.cpu_count() or 1)
        self._lanes = _Lanes(self.slots, max(0, int(max_queue)))
        # A thread per slot; the large lane's at a lower CPU priority, so that the small images'
        # requests (and the event loop) come first on busy cores.
        self._threads = {"small": ThreadPoolExecutor(self._lanes.capacity["small"], thread_name_prefix="ois-small"),
                         "large": ThreadPoolExecutor(self._lanes.capacity["large"], thread_name_prefix="ois-large",
                                                     initializer=_lower_priority)}
        self._closed = False
        self.counters = {"hits": 0, "misses": 0, "evictions": 0, "encodes": 0, "decodes": 0, "rejected": 0,
                         "abandoned": 0}

    # -- the API -----------------------------------------------------------------------------
    # add_image, masks, state: below, with the admission
    async def delete(self, image_id: str) -> None:
        with self._lock:
            entry = self._cache.pop(image_id, None)
            if entry is None:
                raise self._not_found(image_id)
            self._bytes -= entry.nbytes

    async def model_file(self, name: str) -> bytes:
        """A decoder graph listed in the manifest (the only files served)."""
        graphs = self._decoder_graphs()
        if name not in graphs:
            raise ApiError(404, f"no model file {name!r}; served: {', '.join(graphs) or 'none'}")
        return await anyio.to_thread.run_sync((self.export_dir / name).read_bytes)

    async def stats(self) -> dict:
        """Cache and model counters, for /metrics."""
        with self._lock:
            return {"entries": len(self._cache), "bytes": self._bytes, "capacity_bytes": self.capacity,
                    "in_flight": self._lanes.in_flight, **self.counters}

    def model_info(self) -> dict:
        return {
            "backend": self.runner.name,
            "precision": self.runner.precision,
            "preset": self.cfg.name,
            "input_size": self.cfg.input_size,
            "max_clicks": self.max_clicks,
            "formats": list(FORMATS),
            "decoder_graphs": {meta["precision"]: f"/v1/model/{name}" for name, meta in self._decoder_graphs().items()},
            "manifest": self._public_manifest(),
        }

    def ready(self) -> bool:
        return not self._closed  # the graphs are loaded before the service exists

    def close(self) -> None:
        self._closed = True
        for threads in self._threads.values():
            threads.shutdown(wait=True, cancel_futures=True)
        self.runner.close()

    def _public_manifest(self) -> dict | None:
        """The manifest without the exporting machine's paths: the weights file by name only."""
        if not self.manifest:
            return self.manifest
        weights = dict(self.manifest.get("weights", {}))
        if isinstance(weights.get("path"), str):
            weights["path"] = Path(weights["path"]).name
        return {**self.manifest, "weights": weights}

    # -- admission: two bounded lanes in front of the model slots -----------------------------
    async def add_image(self, data: bytes) -> dict:
        data = bytes(data)
        return await self._run(self._pixels_of_upload(data), self._add_image, data)

    async def masks(self, image_id: str, clicks: list[Click], fmt: str = "rle") -> dict:
        return await self._run(self._pixels_of(image_id), self._masks, image_id, list(clicks), fmt)

    async def state(self, image_id: str) -> bytes:
        return await self._run(self._pixels_of(image_id), self._state, image_id)

    def _pixels_of(self, image_id: str) -> int:
        with self._lock:
            entry = self._cache.get(image_id)
        return entry.encoded.frame.width * entry.encoded.frame.height if entry is not None else 0

    def _pixels_of_upload(self, data: bytes) -> int:
        """The image's pixels from its header (a bad file: 0, small; the work then says why)."""
        try:
            width, height, _ = image_header(data)
        except UserError:
            return 0
        return width * height

    async def _run(self, pixels: int, work, *args):
        """work(*args, stop) in a worker thread once a slot of its lane is free; 503 when the lane
        has max_queue requests waiting. Cancelled (the client went away): `stop` is set, the thread
        ends before its next model call and frees the slot; the caller does not wait for it."""
        lane = self._lanes.lane(pixels)
        if not self._lanes.admit(lane):
            with self._lock:
                self.counters["rejected"] += 1
            raise ApiError(503, f"the server is busy: {self._lanes.in_flight} model requests are running or waiting; "
                                "retry shortly")
        loop, stop = asyncio.get_running_loop(), threading.Event()
        try:
            await self._lanes.acquire(lane)
        except BaseException as e:
            self._lanes.leave(lane)
            if isinstance(e, asyncio.CancelledError):  # gone while waiting: it never runs
                with self._lock:
                    self.counters["abandoned"] += 1
            raise

        def in_slot():
            try:
                self._check(stop)
                return work(*args, stop)
            finally:
                loop.call_soon_threadsafe(self._lanes.release, lane)

        result = asyncio.wrap_future(self._threads[lane].submit(in_slot))
        result.add_done_callback(lambda f: f.cancelled() or f.exception())  # an abandoned one's error: nobody's
        try:
            return await asyncio.shield(result)
        except asyncio.CancelledError:
            stop.set()
            with self._lock:
                self.counters["abandoned"] += 1
            raise

    @staticmethod
    def _check(stop: threading.Event) -> None:
        if stop.is_set():
            raise _Abandoned

    # -- work, in worker threads -------------------------------------------------------------
    def _add_image(self, data: bytes, stop: threading.Event) -> dict:
        image_id = hashlib.sha256(data).hexdigest()
        with self._lock:
            entry = self._cache.get(image_id)
            if entry is not None:
                self._cache.move_to_end(image_id)
                self.counters["hits"] += 1
                frame = entry.encoded.frame
                return {"image_id": image_id, "width": frame.width, "height": frame.height, "encoder_ms": 0.0,
                        "cached": True}
        try:
            if not data:
                raise UserError("the image is empty: send the image file's bytes as the request body")
            width, height, _ = image_header(data)
            if width * height > self.max_image_pixels:
                raise ApiError(413, f"the image is {width}x{height} = {width * height:,} pixels, over this server's "
                                    f"limit of {self.max_image_pixels:,}")
            image = decode_image(data, self.max_image_pixels)
            self._check(stop)
            start = time.perf_counter()
            with self._run_lock:
                encoded = encode_image(self.runner, image)
            encoder_ms = (time.perf_counter() - start) * 1000
            del image
        except ImageTooLarge as e:
            raise ApiError(413, str(e)) from None
        except UserError as e:
            raise ApiError(400, str(e)) from None
        with self._lock:
            self.counters["encodes"] += 1
            if image_id not in self._cache:  # a concurrent upload of the same bytes may have won
                self.counters["misses"] += 1
                entry = _Entry(encoded, _state_nbytes(self.runner, encoded.state))
                self._cache[image_id] = entry
                self._bytes += entry.nbytes
            self._cache.move_to_end(image_id)
            self._evict()
        return {"image_id": image_id, "width": encoded.frame.width, "height": encoded.frame.height,
                "encoder_ms": round(encoder_ms, 3), "cached": False}

    def _masks(self, image_id: str, clicks: list[Click], fmt: str, stop: threading.Event) -> dict:
        if fmt not in FORMATS:
            raise ApiError(400, f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
        entry = self._get(image_id)
        frame = entry.encoded.frame
        if not 1 <= len(clicks) <= self.max_clicks:
            raise ApiError(400, f"give between 1 and {self.max_clicks} clicks, got {len(clicks)}")
        seq = []
        for x, y, positive in clicks:
            if not (math.isfinite(x) and math.isfinite(y)):
                raise ApiError(400, f"click coordinates must be finite numbers, got ({x}, {y})")
            try:
                frame.check_click(x, y)
            except UserError as e:
                raise ApiError(400, str(e)) from None
            seq.append((float(x), float(y), bool(positive)))
        # The longest kept prefix of this sequence (at most all but its last click).
        start, prev = 0, None
        with self._lock:
            for k in range(len(seq) - 1, 0, -1):
                prev = entry.prefixes.get(tuple(seq[:k]))
                if prev is not None:
                    entry.prefixes.move_to_end(tuple(seq[:k]))
                    start = k
                    break
        prev = empty_prev(self.runner) if prev is None else prev
        new = []
        t0 = time.perf_counter()
        for k in range(start, len(seq)):
            self._check(stop)
            with self._run_lock:
                prediction, prev = decode_clicks(self.runner, entry.encoded, seq[:k + 1], prev, with_logits=False)
            new.append((tuple(seq[:k + 1]), prev))
            with self._lock:
                self.counters["decodes"] += 1  # as they run: a request stopped half-way counts what it ran
        decoder_ms = (time.perf_counter() - t0) * 1000
        with self._lock:
            if self._cache.get(image_id) is entry:  # still cached: keep the new prefixes
                before = entry.nbytes
                for key, p in new[-MAX_PREFIXES:]:
                    entry.prefixes[key] = p
                    entry.prefixes.move_to_end(key)
                while len(entry.prefixes) > MAX_PREFIXES:
                    entry.prefixes.popitem(last=False)
                self._bytes += entry.nbytes - before
                self._evict()
        mask = prediction.mask
        return {"image_id": image_id, "width": frame.width, "height": frame.height, "clicks": len(seq),
                "decoder_ms": round(decoder_ms, 3), "decodes": len(new), "area": int(mask.sum()),
                "format": fmt, "mask": encode_mask(mask, fmt)}

    def _state(self, image_id: str, stop: threading.Event) -> bytes:
        from safetensors.numpy import save

        entry = self._get(image_id)
        with self._run_lock:
            arrays = self.runner.state_to_numpy(entry.encoded.state)
        frame = entry.encoded.frame
        meta = {"image_id": image_id, "width": str(frame.width), "height": str(frame.height),
                "input_size": str(frame.size), "preset": self.cfg.name, "precision": self.runner.precision}
        return save({name: np.ascontiguousarray(arrays[name]) for name in ENCODER_OUTPUTS}, metadata=meta)

    # -- cache -------------------------------------------------------------------------------
    def _get(self, image_id: str) -> _Entry:
        with self._lock:
            entry = self._cache.get(image_id)
            if entry is None:
                self.counters["misses"] += 1
                raise self._not_found(image_id)
            self.counters["hits"] += 1
            self._cache.move_to_end(image_id)
            return entry

    def _evict(self) -> None:
        """Drop least recently used images until the cache fits; the most recent one always stays
        (requests in flight keep their own reference to an evicted entry)."""
        while self._bytes > self.capacity and len(self._cache) > 1:
            _, entry = self._cache.popitem(last=False)
            self._bytes -= entry.nbytes
            self.counters["evictions"] += 1

    @staticmethod
    def _not_found(image_id: str) -> ApiError:
        return ApiError(404, f"unknown image {image_id}: it was never posted, was deleted or was evicted from the "
                             "cache; POST the image to /v1/images again")

    def _decoder_graphs(self) -> dict[str, dict]:
        if not self.manifest:
            return {}
        return {name: meta for name, meta in self.manifest["graphs"].items() if meta.get("role") == "decoder"}


class _Lanes:
    """The model slots, handed out in the event loop, in two lanes with their own slots: `slots`
    for requests on small images, slots - 1 (at least one) for large ones, so that a flood of
    large images never holds the slots small ones need (both lanes full: the cores are shared
    by up to 2 x slots - 1 threads, the large images' memory stays that of slots - 1). Each lane
    admits `slots + max_queue` requests (running or waiting), first come first served."""

    def __init__(self, slots: int, max_queue: int):
        self.capacity = {"small": slots, "large": max(1, slots - 1)}
        self.limit = {lane: n + max_queue for lane, n in self.capacity.items()}
        self.admitted = {"small": 0, "large": 0}
        self.running = {"small": 0, "large": 0}
        self.waiting = {"small": deque(), "large": deque()}

    @property
    def in_flight(self) -> int:
        return sum(self.admitted.values())

    @staticmethod
    def lane(pixels: int) -> str:
        return "large" if pixels > LARGE_PIXELS else "small"

    def admit(self, lane: str) -> bool:
        if self.admitted[lane] >= self.limit[lane]:
            return False
        self.admitted[lane] += 1
        return True

    def leave(self, lane: str) -> None:
        self.admitted[lane] -= 1

    async def acquire(self, lane: str) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self.waiting[lane].append(waiter)
        self._dispatch(lane)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # granted as it was cancelled: give it back
                self.running[lane] -= 1
                self._dispatch(lane)
            else:
                self.waiting[lane].remove(waiter)
            raise

    def release(self, lane: str) -> None:
        self.running[lane] -= 1
        self.admitted[lane] -= 1
        self._dispatch(lane)

    def _dispatch(self, lane: str) -> None:
        waiting = self.waiting[lane]
        while waiting and self.running[lane] < self.capacity[lane]:
            waiter = waiting.popleft()
            if not waiter.done():
                self.running[lane] += 1
                waiter.set_result(None)
