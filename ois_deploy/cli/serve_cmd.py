"""`ois-deploy serve`: the HTTP API v1 (docs/serving.md) on uvicorn."""

from __future__ import annotations

import math
import os
import sys
from typing import Optional

import typer

from ..errors import UserError
from .app import BackendOpt, DeviceOpt, PrecisionOpt, app
from .console import note

MAX_MB = 1 << 30  # MiB: 1 PiB, over any memory; a larger size overflows the byte counts
MAX_S = 86_400  # a day


@app.command()
def serve(
    model: str = typer.Argument(..., help="Export folder (any backend) or preset name (torch backends)."),
    backend: Optional[str] = BackendOpt,
    precision: str = PrecisionOpt,
    device: Optional[str] = DeviceOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; 0.0.0.0 exposes the server to the network."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port; 0 picks a free one."),
    cache_mb: float = typer.Option(1024, "--cache-mb", min=0, help="Bound of the image-state cache, MiB (LRU)."),
    max_body_mb: float = typer.Option(50, "--max-body-mb", min=0, help="Largest request body, MiB (413 above)."),
    max_image_pixels: int = typer.Option(40_000_000, "--max-image-pixels", min=1,
                                         help="Largest image, width x height (413 above, checked before decoding)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="OIS_API_KEY", show_envvar=True,
                                          help="Require Authorization: Bearer KEY (all routes but /healthz, /readyz)."),
    allow_origin: list[str] = typer.Option([], "--allow-origin", help="Origin allowed cross-origin requests; repeat."),
    read_timeout: float = typer.Option(10, "--read-timeout", min=0.1,
                                       help="Seconds a client may take for a request's head, between parts of its body, "
                                            "and to read 48 KiB of an answer (408 or closed after)."),
    body_deadline: float = typer.Option(120, "--body-deadline", min=1,
                                        help="Seconds a request body may take in all (408 after)."),
    max_connections: int = typer.Option(1000, "--max-connections", min=1,
                                        help="Open connections; over it, the one idle the longest is closed."),
    max_queue: int = typer.Option(32, "--max-queue", min=0,
                                  help="Model requests waiting for a free slot (one per core); 503 + Retry-After above."),
    threads: int = typer.Option(0, "--threads", min=0, help="Intra-op threads per model call (0: the backend's default)."),
    ray: bool = typer.Option(False, "--ray", help="Deploy on Ray Serve: replicas behind one endpoint (extra: ray)."),
    replicas: int = typer.Option(1, "--replicas", min=1, help="With --ray: model replicas."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="With --ray: a Ray cluster (default: start a local one)."),
    cpus_per_replica: float = typer.Option(1, "--cpus-per-replica", min=0, help="With --ray: CPUs each replica reserves."),
    gpus_per_replica: float = typer.Option(0, "--gpus-per-replica", min=0, help="With --ray: GPUs each replica reserves."),
    label_studio: bool = typer.Option(False, "--label-studio", help="Also serve Label Studio's ML-backend API under "
                                      "/label-studio (docs/label-studio.md; extra: label-studio)."),
    label_studio_url: Optional[str] = typer.Option(None, "--label-studio-url", envvar="LABEL_STUDIO_URL", show_envvar=True,
                                                   help="With --label-studio: Label Studio's address, where task images are fetched."),
    label_studio_token: Optional[str] = typer.Option(None, "--label-studio-token", envvar="LABEL_STUDIO_API_KEY",
                                                     show_envvar=True, show_default=False,
                                                     help="With --label-studio: its API token (prefer the environment variable)."),
    label_studio_allow_host: list[str] = typer.Option([], "--label-studio-allow-host",
                                                      help="With --label-studio: an origin (scheme://host[:port]; a bare "
                                                           "host: https, port 443) task images may be fetched from; repeat."),
    label_studio_fetch_timeout: float = typer.Option(30.0, "--label-studio-fetch-timeout", min=0.1, max=600,
                                                     help="With --label-studio: seconds a whole image fetch may take."),
):
    """Serve a model over HTTP: post an image once, then post click sequences for masks."""
    from ..runtime.registry import RunnerSpec, default_backend, open_runner
    from ..serve.app import create_app
    from ..serve.server import bind_socket, run_uvicorn, url_of
    from ..serve.service import SegmentationService

    import fastapi, uvicorn  # noqa: F401,E401  (a missing extra ends here, as one line)

    if api_key is None and "OIS_API_KEY" in os.environ:  # typer takes an empty variable for none given
        api_key = os.environ["OIS_API_KEY"]
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key (or OIS_API_KEY) is empty: give a key, or unset OIS_API_KEY to serve without one")
    for name, value, most in (("--cache-mb", cache_mb, MAX_MB), ("--max-body-mb", max_body_mb, MAX_MB),
                              ("--read-timeout", read_timeout, MAX_S), ("--body-deadline", body_deadline, MAX_S)):
        if not math.isfinite(value) or value > most:
            raise UserError(f"{name} must be a finite number up to {most:,}, not {value:g}")
    spec = RunnerSpec(backend or default_backend(model), model, precision, device=device, threads=threads)
    ls_options = None
    if label_studio:
        from ..serve.label_studio import options_from_cli

        ls_options = options_from_cli(label_studio_url, label_studio_token, label_studio_allow_host, max_body_mb, ray,
                                      label_studio_fetch_timeout)
    if ray:
        from ..serve.ray_app import RayOptions, serve_on_ray

        opts = RayOptions(replicas, cpus_per_replica, gpus_per_replica, cache_mb, max_image_pixels, api_key,
                          tuple(allow_origin), max_body_mb, read_timeout=read_timeout, max_queue=max_queue)
        return serve_on_ray(spec, opts, host, port, ray_address)
    runner = open_runner(spec)
    note(*runner.notes)
    service = SegmentationService(runner, cache_mb=cache_mb, max_image_pixels=max_image_pixels,
                                  export_dir=spec.export_dir, max_queue=max_queue)
    asgi_app = create_app(service, api_key=api_key, allow_origins=allow_origin, max_body_mb=max_body_mb,
                          read_timeout=read_timeout, body_deadline=body_deadline, label_studio=ls_options)
    sock = bind_socket(host, port)
    # The URL on stdout, flushed: scripts and tests read it (the socket already listens).
    print(f"serving {runner.cfg.name} ({runner.name} {runner.precision}) at {url_of(sock)}", flush=True)
    try:
        run_uvicorn(asgi_app, sock, head_timeout=read_timeout, keep_alive_timeout=read_timeout,
                    max_connections=max_connections)
    finally:
        service.close()
    print("stopped", file=sys.stderr)
