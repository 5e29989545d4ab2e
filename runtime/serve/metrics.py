"""`/metrics` with prometheus_client: request counts and latency by route, queue, model and camera gauges."""
from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _Live:
    """Gauges read when scraped (queue depth, open connections, camera counters)."""

    def __init__(self, read: Callable[[], dict[str, float]]):
        self.read = read

    def collect(self) -> Iterator[Any]:
        for name, value in self.read().items():
            if name.endswith("_total"):
                c = CounterMetricFamily(name[: -len("_total")], name.replace("_", " "))
                c.add_metric([], value)
                yield c
            else:
                g = GaugeMetricFamily(name, name.replace("_", " "))
                g.add_metric([], value)
                yield g


class Metrics:
    def __init__(self, read_live: Callable[[], dict[str, float]]):
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter("molmo_http_requests", "HTTP requests by route and status.", ["route", "code"],
                                registry=self.registry)
        self.latency = Histogram("molmo_http_request_duration_seconds", "Time from request headers to the last byte.",
                                 ["route"], buckets=_BUCKETS, registry=self.registry)
        ProcessCollector(registry=self.registry)   # process_resident_memory_bytes, cpu, open fds (Linux)
        self.registry.register(_Live(read_live))
        self.rejected = self.timeouts = 0

    def record(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status == 503:
            self.rejected += 1
        elif status == 504:
            self.timeouts += 1

    def render(self) -> bytes:
        return generate_latest(self.registry)
