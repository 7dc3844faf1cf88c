"""`GET /metrics` in Prometheus' text format (`prometheus-client`), one registry per server.

What is counted: HTTP requests by route and status (`MetricsMiddleware`); prompt and completion tokens,
time to first token and the time per output token of every generation when it ends (a `ChatService`
observer; the timings are the engine's own `ttft_s` / `decode_s`); and, read from the engine at each
scrape, the requests running and waiting, the cache rows in use out of the rows there are, and the prompt
cache's counters (`gpt2chat_prompt_cache_*_total`: requests looked up, hits, prompt tokens reused out of
prompt tokens admitted, evictions; the hit rate is `hits / queries`, the token hit rate
`cached_tokens / prompt_tokens`).
This module knows nothing about tokens or templates.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpt2chat.serve.service import ChatService, Generation

__all__ = ["ServerMetrics", "MetricsMiddleware", "CONTENT_TYPE_LATEST"]

PREFIX = "gpt2chat"
CACHE_COUNTERS = {
    "queries": "requests that looked up the prompt cache (every request given a cache row)",
    "hits": "requests that reused a cached prompt prefix",
    "cached_tokens": "prompt tokens whose keys / values came from the prompt cache",
    "prompt_tokens": "prompt tokens of the requests that looked up the prompt cache",
    "evictions": "prompt cache entries dropped to give their row to an unrelated request",
}
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


class _EngineCollector:
    """Gauges read from the engine when scraped (so they are never stale)."""

    def __init__(self, service: ChatService):
        self.service = service

    def collect(self):
        engine = self.service.engine
        running = getattr(engine, "active_count", 0)
        rows = getattr(engine, "max_batch_size", self.service.limits.max_batch_size)
        values = {
            "requests_running": ("requests decoding in the engine now", running),
            "requests_waiting": ("requests waiting for a free cache row", getattr(engine, "pending_count", 0)),
            "cache_rows_in_use": ("KV-cache rows holding a request", running),
            "cache_rows": ("KV-cache rows of the engine (the most requests decoded together)", rows),
        }
        for name, (documentation, value) in values.items():
            yield GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value)
        stats = getattr(engine, "cache_stats", None)
        if stats is not None:
            for name, documentation in CACHE_COUNTERS.items():
                yield CounterMetricFamily(f"{PREFIX}_prompt_cache_{name}", documentation, value=getattr(stats, name))


class ServerMetrics:
    """The counters and histograms of one server; `observe` is a `ChatService` observer."""

    def __init__(self, service: ChatService):
        self.registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=self.registry)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "prompt tokens of finished generations",
                                     registry=self.registry)
        self.completion_tokens = Counter(f"{PREFIX}_completion_tokens", "tokens generated",
                                         registry=self.registry)
        self.generations = Counter(f"{PREFIX}_generations", "generations ended, by finish reason",
                                   ["finish_reason"], registry=self.registry)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                              "from submission to the engine to the first token sampled",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.per_token = Histogram(f"{PREFIX}_time_per_output_token_seconds",
                                   "mean time between two tokens of one generation (decode time / (tokens - 1))",
                                   buckets=TOKEN_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(service))
        service.observers.append(self.observe)

    def observe(self, generation: Generation) -> None:
        # a prompt shared by n choices is one prompt: count it with the first choice only
        if getattr(generation, "first_choice", True):
            self.prompt_tokens.inc(generation.prompt_tokens)
        self.completion_tokens.inc(generation.completion_tokens)
        self.generations.labels(generation.finish_reason or "cancelled").inc()
        if generation.ttft_s is not None:
            self.ttft.observe(generation.ttft_s)
        tokens = generation.completion_tokens
        if generation.decode_s is not None and tokens > 1:
            self.per_token.observe(generation.decode_s / (tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every HTTP answer by route (the known ones; anything else is "other") and status."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in ROUTES else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, recording_send)
