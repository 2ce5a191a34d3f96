"""Prometheus metrics of the redirect, kept as plain integers on the hot path.

``prometheus_client`` metric objects take a lock per update; here a request costs a dict
increment and a ``bisect`` and the families are built only when ``/metrics`` is scraped.
Each app has its own registry, so several apps (tests) can live in one process.
"""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class RedirectMetrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self._bucket_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0
        self.gauges: dict[str, tuple[str, float]] = {}  # name -> (help, value), refreshed per scrape
        self.counters: dict[str, tuple[str, Callable[[], float]]] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)  # type: ignore[arg-type]

    def observe(self, hop: str, status: int, seconds: float) -> None:
        key = (hop, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        self._bucket_counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self._latency_sum += seconds

    def counter(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.counters[name] = (help_text, read)

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "trackly_redirect_requests", "Requests answered, by hop and status", labels=["hop", "status"]
        )
        for (hop, status), count in sorted(self.requests.items()):
            requests.add_metric([hop, str(status)], count)
        yield requests
        cumulative = 0
        buckets = []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self._bucket_counts):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily(
            "trackly_redirect_request_seconds", "Time from request to response start",
            buckets=buckets, sum_value=self._latency_sum,
        )
        for name, (help_text, read) in self.counters.items():
            yield CounterMetricFamily(name, help_text, value=read())
        for name, (help_text, value) in self.gauges.items():
            yield GaugeMetricFamily(name, help_text, value=value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
