"""Prometheus metrics of one app, in its own registry (several apps may live in one process).

Request counts and latencies are observed per route template (bounded label values). Encoder and
decoder times come from the service's responses, and cache figures from its `stats()` at scrape
time, so any object with the service's methods (a proxy to Ray replicas) gets the same series.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# stats() key -> (metric name, kind, help)
STATS_SERIES = {
    "entries": ("ois_cache_entries", "gauge", "Images whose encoder state is cached."),
    "bytes": ("ois_cache_bytes", "gauge", "Bytes of cached image states and fed-back masks."),
    "capacity_bytes": ("ois_cache_capacity_bytes", "gauge", "The cache bound (--cache-mb)."),
    "hits": ("ois_cache_hits", "counter", "Requests that found their image cached."),
    "misses": ("ois_cache_misses", "counter", "Uploads of new images and requests for unknown images."),
    "evictions": ("ois_cache_evictions", "counter", "Images dropped to keep the cache within its bound."),
    "encodes": ("ois_encodes", "counter", "Encoder runs."),
    "decodes": ("ois_decodes", "counter", "Decoder runs (one per click replayed)."),
    "in_flight": ("ois_model_requests_in_flight", "gauge", "Model requests running or waiting for a slot."),
    "rejected": ("ois_rejected", "counter", "Model requests refused with 503: the queue was full."),
    "abandoned": ("ois_abandoned", "counter", "Model requests stopped because their client went away."),
}


class _StatsCollector:
    """Exposes the last stats() snapshot; the /metrics route refreshes it before each scrape."""

    def __init__(self):
        self.snapshot: dict = {}

    def collect(self):
        for key, value in self.snapshot.items():
            name, kind, doc = STATS_SERIES.get(key, (f"ois_{key}", "gauge", f"{key} (from the service)"))
            family = CounterMetricFamily(name, doc) if kind == "counter" else GaugeMetricFamily(name, doc)
            family.add_metric([], float(value))
            yield family


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("ois_http_requests", "HTTP requests.", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("ois_http_request_duration_seconds", "HTTP request latency.", ["method", "route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        # api: "v1" or "label-studio", the API whose request ran the model
        self.encoder = Histogram("ois_encoder_seconds", "Encoder time per new image.", ["api"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.decoder = Histogram("ois_decoder_seconds", "Decoder time per mask request (all clicks it replayed).",
                                 ["api"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self._stats = _StatsCollector()
        self.registry.register(self._stats)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def observe_encoder(self, seconds: float, api: str = "v1") -> None:
        self.encoder.labels(api).observe(seconds)

    def observe_decoder(self, seconds: float, api: str = "v1") -> None:
        self.decoder.labels(api).observe(seconds)

    def render(self, stats: dict) -> bytes:
        self._stats.snapshot = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
        return generate_latest(self.registry)
