"""API v1 on Ray Serve: N replicas behind one endpoint, image affinity, surviving a lost replica.

Three deployments in one Serve application:
- `ImageStore` (one replica, no CPU): the uploaded bytes by image id, LRU-bounded in bytes, and
  the ids deleted since. It keeps them in its own memory: Ray passes them between processes
  through its object store, but pinned `ray.put` objects may be spilled to disk under memory
  pressure, and uploaded images are never written to disk.
- `SegmentationReplica` (N replicas, F CPUs and G GPUs each): a runner and a `SegmentationService`.
  Every request for an image carries the image id as Serve's multiplexed model id, and the
  deployment's request router (`ImageAffinityRouter`) sends it to the image's replica, chosen by
  rendezvous hashing. A replica that does not hold the image (first contact, eviction, a replica
  set that changed) fetches the bytes from the store and encodes them; the service then replays
  the click sequence, so the mask never depends on the routing.
- `Ingress` (one replica, no CPU): the same FastAPI app as `serve` (create_app), over
  `ReplicaProxy`, an object with the service's methods that forwards to the replicas, retries
  a request whose replica died, and sums the replicas' cache counters for /metrics.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace

import ray
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import FIFOMixin, RequestRouter

from ..errors import UserError, first_line
from ..runtime.registry import RunnerSpec, check_spec
from .metrics import STATS_SERIES
from .service import ApiError

APP_NAME = "ois-deploy"
RETRIES = 5  # attempts of a request whose replica died (Serve routes the next one to a live replica)
STATS_SERIES.setdefault("affinity_hits", (
    "ois_affinity_hits", "counter", "Requests for an image routed to a replica that held its state."))
STATS_SERIES.setdefault("affinity_misses", (
    "ois_affinity_misses", "counter", "Requests for an image whose replica fetched and re-encoded it."))
GAUGES = {key for key, (_, kind, _) in STATS_SERIES.items() if kind == "gauge"}


@dataclass(frozen=True)
class RayOptions:
    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    cache_mb: float = 1024  # per replica; also the store's bound on uploaded bytes
    max_image_pixels: int = 40_000_000
    api_key: str | None = None
    allow_origins: tuple[str, ...] = ()
    max_body_mb: float = 50
    read_timeout: float = 10
    max_queue: int = 32  # per replica

    @property
    def calls_per_replica(self) -> int:
        """Model calls a replica runs at once: one per CPU it reserves (each with spec.threads
        intra-op threads), so that N replicas use N times the cores of one."""
        return max(1, int(self.cpus_per_replica))


async def _now(value):
    return value


def _error(e: ApiError) -> tuple:
    return ("error", (e.status, e.message))  # ApiError does not survive pickling: sent as values


# -- the store -------------------------------------------------------------------------------
@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class ImageStore:
    def __init__(self, capacity_mb: float):
        self.capacity = int(capacity_mb * (1 << 20))
        self.images: OrderedDict[str, bytes] = OrderedDict()
        self.deleted: OrderedDict[str, None] = OrderedDict()  # ids deleted since, bounded
        self.nbytes = 0

    async def put(self, image_id: str, data: bytes) -> None:
        self.deleted.pop(image_id, None)
        if image_id not in self.images:
            self.images[image_id] = data
            self.nbytes += len(data)
        self.images.move_to_end(image_id)
        while self.nbytes > self.capacity and len(self.images) > 1:
            self.nbytes -= len(self.images.popitem(last=False)[1])

    async def get(self, image_id: str) -> bytes | None:
        data = self.images.get(image_id)
        if data is not None:
            self.images.move_to_end(image_id)
        return data

    async def status(self, image_id: str) -> str:
        """present (and now most recently used), deleted, or unknown (never posted or evicted)."""
        if image_id in self.images:
            self.images.move_to_end(image_id)
            return "present"
        return "deleted" if image_id in self.deleted else "unknown"

    async def delete(self, image_id: str) -> bool:
        data = self.images.pop(image_id, None)
        if data is not None:
            self.nbytes -= len(data)
        self.deleted[image_id] = None
        while len(self.deleted) > 100_000:
            self.deleted.popitem(last=False)
        return data is not None


# -- the replicas ----------------------------------------------------------------------------
class ImageAffinityRouter(FIFOMixin, RequestRouter):
    """Each image's requests to one replica: the highest hash of (image id, replica id), known at
    once by every router without any state (Serve's own multiplex routing learns where an image is
    only after the replica reports it, ~0.1 s: the first clicks after an upload then reach another
    replica, both end up holding the image, and clicks alternate between them, replaying the
    sequence each time). A replica that joins or goes moves only its share of the images. Should
    the image's replica be full, the next in hash order; requests without an image: the least
    loaded replica."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        image_id = pending_request.metadata.multiplexed_model_id if pending_request else ""
        if not image_id:
            return [candidate_replicas]

        def score(replica) -> bytes:
            return hashlib.blake2b(f"{image_id}/{replica.replica_id.unique_id}".encode(), digest_size=8).digest()

        return [[r] for r in sorted(candidate_replicas, key=score, reverse=True)]


def replica_deployment(opts: RayOptions):
    @serve.deployment(num_replicas=opts.replicas, max_ongoing_requests=64,
                      ray_actor_options={"num_cpus": opts.cpus_per_replica, "num_gpus": opts.gpus_per_replica},
                      request_router_config=RequestRouterConfig(request_router_class=ImageAffinityRouter))
    class SegmentationReplica:
        def __init__(self, spec: RunnerSpec, store):
            from ..runtime.registry import open_runner
            from .service import SegmentationService

            self.service = SegmentationService(open_runner(spec), cache_mb=opts.cache_mb,
                                               max_image_pixels=opts.max_image_pixels, export_dir=spec.export_dir,
                                               max_queue=opts.max_queue, slots=opts.calls_per_replica)
            self.store = store
            self.slots = asyncio.Semaphore(opts.calls_per_replica)
            self.affinity = {"affinity_hits": 0, "affinity_misses": 0}
            self.name = ray.get_runtime_context().get_actor_name()

        async def add_image(self, data: bytes):
            return await self._reply(self._run(self.service.add_image, data))

        async def masks(self, image_id: str, clicks: list, fmt: str):
            return await self._reply(self._for_image(image_id, self.service.masks, image_id, clicks, fmt))

        async def state(self, image_id: str):
            return await self._reply(self._for_image(image_id, self.service.state, image_id))

        async def delete(self, image_id: str):
            return await self._reply(self.service.delete(image_id))

        async def model_file(self, name: str):
            return await self._reply(self.service.model_file(name))

        async def model_info(self):
            return await self._reply(_now(self.service.model_info()))

        async def _run(self, method, *args):
            async with self.slots:
                return await method(*args)

        async def _for_image(self, image_id: str, method, *args):
            """The call, on the image's state held here or else fetched from the store and
            encoded. The store is asked at once, in parallel: it marks the image as recently used
            (so an image in use outlives idle ones there) and says whether it was deleted."""
            status = self.store.status.remote(image_id)  # sent now, awaited below
            try:
                result, hit = await self._run(method, *args), True
            except ApiError as e:
                if e.status != 404:
                    raise
                result, hit = None, False
            if await status == "deleted":  # through another replica, since this one saw it
                if hit:
                    await self.service.delete(image_id)
                raise self.service._not_found(image_id)
            if hit:
                self.affinity["affinity_hits"] += 1
                return result
            data = await self.store.get.remote(image_id)
            if data is None:  # never posted, or evicted from the store too
                raise self.service._not_found(image_id)
            self.affinity["affinity_misses"] += 1
            await self._run(self.service.add_image, data)
            return await self._run(method, *args)

        async def _reply(self, work) -> tuple:
            """(kind, value, stats): every reply carries this replica's counters, which the
            ingress sums for /metrics."""
            try:
                reply = ("ok", await work)
            except ApiError as e:
                reply = _error(e)
            stats = {**await self.service.stats(), **self.affinity}
            return (*reply, (self.name, stats))

    return SegmentationReplica


# -- the ingress -----------------------------------------------------------------------------
def _alive(actor_name: str) -> bool:
    try:
        ray.get_actor(actor_name, namespace="serve")
        return True
    except ValueError:  # a dead actor's name is free
        return False


class ReplicaProxy:
    """The service's methods, answered by the replicas (app.py awaits only these)."""

    def __init__(self, replicas, store):
        self.replicas, self.store = replicas, store
        self.info: dict | None = None
        self.stats_by_replica: dict[str, dict] = {}

    async def start(self) -> None:
        self.info = await self._call(None, "model_info")

    async def add_image(self, data: bytes) -> dict:
        image_id = hashlib.sha256(data).hexdigest()
        info = await self._call(image_id, "add_image", data)
        await self.store.put.remote(image_id, data)  # before the reply: any replica can now fetch it
        return info

    async def masks(self, image_id: str, clicks: list, fmt: str = "rle") -> dict:
        return await self._call(image_id, "masks", image_id, [tuple(c) for c in clicks], fmt)

    async def state(self, image_id: str) -> bytes:
        return await self._call(image_id, "state", image_id)

    async def delete(self, image_id: str) -> None:
        stored = await self.store.delete.remote(image_id)  # first: replicas then refuse it
        try:
            await self._call(image_id, "delete", image_id)  # frees the state where it was routed
        except ApiError:
            if not stored:
                raise

    async def model_file(self, name: str) -> bytes:
        return await self._call(None, "model_file", name)

    def model_info(self) -> dict:
        return self.info

    def ready(self) -> bool:
        return self.info is not None

    async def stats(self) -> dict:
        for name, stats in self.stats_by_replica.items():  # a lost replica: its gauges go, its counters stay
            if any(stats.get(key) for key in GAUGES) and not await asyncio.to_thread(_alive, name):
                stats.update(dict.fromkeys(GAUGES & stats.keys(), 0))
        total: dict[str, float] = {}
        for stats in self.stats_by_replica.values():
            for key, value in stats.items():
                total[key] = total.get(key, 0) + value
        return total

    async def _call(self, image_id: str | None, method: str, *args):
        handle = self.replicas.options(multiplexed_model_id=image_id) if image_id else self.replicas
        for attempt in range(RETRIES):
            try:
                kind, value, (replica, stats) = await getattr(handle, method).remote(*args)
                break
            except RayActorError:  # it died answering; once Serve drops it, the retry reaches another
                await asyncio.sleep(0.2 * 2 ** attempt)
        else:
            raise ApiError(503, "no replica answered (one was lost); retry the request")
        self.stats_by_replica[replica] = stats
        if kind == "error":
            raise ApiError(*value)
        return value


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress()
class Ingress:
    def __init__(self, replicas, store, opts: RayOptions):
        self.proxy = ReplicaProxy(replicas, store)
        self.opts = opts

    async def __serve_build_asgi_app__(self):
        from .app import create_app

        await self.proxy.start()
        return create_app(self.proxy, api_key=self.opts.api_key, allow_origins=self.opts.allow_origins,
                          max_body_mb=self.opts.max_body_mb, read_timeout=self.opts.read_timeout)


def build_app(spec: RunnerSpec, opts: RayOptions):
    """The Serve application: Ingress -> SegmentationReplica x N, both -> ImageStore."""
    check_spec(spec)  # bad arguments end here, as one line, before anything is deployed
    spec = replace(spec, threads=spec.threads or 1)
    store = ImageStore.bind(opts.cache_mb)
    replicas = replica_deployment(opts).bind(spec, store)
    return Ingress.bind(replicas, store, opts)


# -- running it ------------------------------------------------------------------------------
def serve_on_ray(spec: RunnerSpec, opts: RayOptions, host: str, port: int, address: str | None) -> None:
    """`ois-deploy serve --ray`: deploy, print the URL, and on SIGINT/SIGTERM remove the
    application (Serve lets requests in flight finish); a local Ray instance stops with it."""
    from .server import bind_socket

    build_app(spec, opts)  # bad arguments end as one line before Ray starts
    with bind_socket(host, port) as sock:  # a port in use is a one-line error; 0 picks a free one
        port = sock.getsockname()[1]
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    try:
        ray.init(address=address or "local", include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot connect to Ray at {address}: {first_line(e)}") from None
    try:
        print(f"ray: {'connected to' if address else 'started a local instance at'} "
              f"{ray.get_runtime_context().gcs_address}", file=sys.stderr, flush=True)
        url = deploy(spec, opts, host, port)
        # The URL on stdout, flushed: scripts and tests read it (every replica is up).
        print(f"serving {spec.model} ({spec.backend} {spec.precision}) on Ray Serve, {opts.replicas} "
              f"replica{'s' if opts.replicas > 1 else ''}, at {url}", flush=True)
        wait_for_signal()
    finally:
        shutdown(local=address is None)
    print("stopped", file=sys.stderr)


def deploy(spec: RunnerSpec, opts: RayOptions, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Deploy on the connected Ray instance; returns the URL once every replica is up."""
    need = {"CPU": opts.replicas * opts.cpus_per_replica, "GPU": opts.replicas * opts.gpus_per_replica}
    have = ray.cluster_resources()
    for kind, amount in need.items():
        if amount > have.get(kind, 0):
            raise UserError(f"{opts.replicas} replicas need {amount:g} {kind}s and the Ray cluster has "
                            f"{have.get(kind, 0):g}: lower --replicas or --{kind.lower()}s-per-replica")
    app = build_app(spec, opts)
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(app, name=APP_NAME, route_prefix="/")
    except RuntimeError as e:  # a replica that failed to start (its error is in Ray's logs)
        raise UserError(f"the deployment failed: {first_line(e)}") from None
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1):
        pass


def shutdown(local: bool) -> None:
    """Remove the application (requests in flight finish); a local instance stops too."""
    try:
        if serve.status().applications.get(APP_NAME):
            serve.delete(APP_NAME)
        if local:
            serve.shutdown()
    finally:
        ray.shutdown()
