"""Prometheus metrics of the service, served on their own port (CHATWIRE_METRICS_PORT, default 9464)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()
# Latencies from milliseconds (cached prompts) to minutes (long replies under load).
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter(
    "chatwire_requests_total",
    "RPCs handled, by method, model and gRPC status.",
    ["method", "model", "status"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "chatwire_request_duration_seconds", "RPC duration.", ["method", "model"], buckets=_SECONDS, registry=REGISTRY
)
FIRST_TOKEN_SECONDS = Histogram(
    "chatwire_time_to_first_token_seconds",
    "Time from request to its first generated token.",
    ["model"],
    buckets=_SECONDS,
    registry=REGISTRY,
)
PROMPT_TOKENS = Counter(
    "chatwire_prompt_tokens_total", "Prompt tokens of finished requests.", ["model"], registry=REGISTRY
)
CACHED_TOKENS = Counter(
    "chatwire_cached_prompt_tokens_total", "Prompt tokens served from the prefix cache.", ["model"], registry=REGISTRY
)
COMPLETION_TOKENS = Counter(
    "chatwire_completion_tokens_total", "Generated tokens, over all choices.", ["model"], registry=REGISTRY
)
ENGINE_RESTARTS = Counter(
    "chatwire_engine_restarts_total",
    "Engine worker processes that died and were restarted.",
    ["model"],
    registry=REGISTRY,
)
_QUEUED = Gauge("chatwire_queued_requests", "Requests waiting for admission.", ["model"], registry=REGISTRY)
_RUNNING = Gauge("chatwire_running_sequences", "Sequences being prefilled or decoded.", ["model"], registry=REGISTRY)
_CACHED = Gauge("chatwire_cached_prefixes", "Finished sequences kept for prefix reuse.", ["model"], registry=REGISTRY)


def watch_engine(model: str, stats: Callable[[], dict[str, int]]) -> None:
    """Gauges that read the engine's state at scrape time."""
    _QUEUED.labels(model).set_function(lambda: stats()["queued_requests"])
    _RUNNING.labels(model).set_function(lambda: stats()["running_sequences"])
    _CACHED.labels(model).set_function(lambda: stats()["cached_prefixes"])


def serve(host: str, port: int) -> int:
    """Serve /metrics on a background thread; returns the bound port."""
    server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    return int(server.server_port)
