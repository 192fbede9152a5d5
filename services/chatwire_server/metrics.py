"""Prometheus metrics of the service, served on their own port (CHATWIRE_METRICS_PORT, default 9464)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)
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
RATE_LIMIT_STORE_FAILURES = Counter(
    "chatwire_rate_limit_store_failures_total",
    "Calls to the shared rate-limit store that failed or timed out (each then used the configured policy).",
    registry=REGISTRY,
)
RATE_LIMIT_STORE_UP = Gauge(
    "chatwire_rate_limit_store_up",
    "1 while budgets are kept in the shared store, 0 while the last call to it failed.",
    registry=REGISTRY,
)
ENGINE_RESTARTS = Counter(
    "chatwire_engine_restarts_total",
    "Engine worker processes that died and were restarted.",
    ["model"],
    registry=REGISTRY,
)


class _EngineGauges(Collector):
    """The engines' state, read at scrape time with one stats request per model. Besides chatwire's own gauges
    (label `model`), the three that Kubernetes' Gateway API Inference Extension and llm-d read from every model
    server, under vLLM's names and label (`model_name`), so chatwire replicas can sit behind their endpoint
    picker as vLLM pods do (docs/design.md, "Metrics for endpoint pickers")."""

    def __init__(self) -> None:
        self._engines: dict[str, Callable[[], dict[str, int]]] = {}

    def watch(self, model: str, stats: Callable[[], dict[str, int]]) -> None:
        self._engines[model] = stats

    def collect(self) -> Iterator[Metric]:
        own = [
            ("chatwire_queued_requests", "Requests waiting for admission.", "queued_requests"),
            ("chatwire_running_requests", "Requests admitted and not yet finished.", "running_requests"),
            ("chatwire_running_sequences", "Sequences being prefilled or decoded.", "running_sequences"),
            ("chatwire_cached_prefixes", "Finished sequences kept for prefix reuse.", "cached_prefixes"),
        ]
        families = [GaugeMetricFamily(name, text, labels=["model"]) for name, text, _ in own]
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting", "Requests waiting for admission.", labels=["model_name"]
        )
        running = GaugeMetricFamily(
            "vllm:num_requests_running", "Requests admitted and not yet finished.", labels=["model_name"]
        )
        kv_text = "Share of KV cache cells held by requests in flight, 0 to 1 (evictable cached prefixes aside)."
        kv_own = GaugeMetricFamily("chatwire_kv_cache_usage_ratio", kv_text, labels=["model"])
        kv_usage = GaugeMetricFamily("vllm:kv_cache_usage_perc", kv_text, labels=["model_name"])
        # Speculative decoding's draft tokens (a prediction's or prompt lookup's): their ratio is the acceptance.
        drafted = CounterMetricFamily(
            "chatwire_draft_tokens", "Draft tokens verified by speculative decoding.", labels=["model"]
        )
        accepted = CounterMetricFamily(
            "chatwire_accepted_draft_tokens", "Draft tokens that speculative decoding kept.", labels=["model"]
        )
        for model, stats in self._engines.items():
            try:
                state = stats()
            except Exception:  # one engine's trouble must not cost the whole scrape (counters included)
                log.exception("engine stats failed", extra={"model": model})
                continue
            for family, (_, _, key) in zip(families, own, strict=True):
                family.add_metric([model], state[key])
            kv_share = state["kv_cells_used"] / max(state["kv_cells_capacity"], 1)
            kv_own.add_metric([model], kv_share)
            waiting.add_metric([model], state["queued_requests"])
            running.add_metric([model], state["running_requests"])
            kv_usage.add_metric([model], kv_share)
            drafted.add_metric([model], state.get("draft_tokens", 0))
            accepted.add_metric([model], state.get("accepted_draft_tokens", 0))
        yield from (*families, kv_own, waiting, running, kv_usage, drafted, accepted)


_ENGINE_GAUGES = _EngineGauges()
REGISTRY.register(_ENGINE_GAUGES)


def watch_engine(model: str, stats: Callable[[], dict[str, int]]) -> None:
    """Report `model`'s engine state (`stats()`, asked once per scrape) in the engine gauges."""
    _ENGINE_GAUGES.watch(model, stats)


def serve(host: str, port: int) -> int:
    """Serve /metrics on a background thread; returns the bound port."""
    server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    return int(server.server_port)
