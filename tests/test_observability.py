"""Metrics after real traffic: the service's Prometheus endpoint and Envoy's stats."""

from __future__ import annotations

import time

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from conftest import MODEL, NO_END_BIAS, Stack


def scrape(chatwire: Stack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{chatwire.ports.metrics}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_tokens_and_latency(chatwire: Stack, client: openai.OpenAI) -> None:
    before = scrape(chatwire)
    system = {"role": "system", "content": "You are terse. " * 30}
    for question in ("Name a colour.", "Name a fruit."):
        reply = client.chat.completions.create(
            model=MODEL, messages=[system, {"role": "user", "content": question}], max_tokens=5, temperature=0
        )
    list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True
        )
    )
    httpx.post(
        f"{chatwire.base_url}/chat/completions", json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}
    )
    after = scrape(chatwire)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("chatwire_requests_total", method="CreateChatCompletion", model=MODEL, status="OK") == 2
    assert delta("chatwire_requests_total", method="StreamChatCompletion", model=MODEL, status="OK") == 1
    assert delta("chatwire_requests_total", method="CreateChatCompletion", model="unknown", status="NOT_FOUND") == 1
    assert delta("chatwire_request_duration_seconds_count", method="CreateChatCompletion", model=MODEL) == 2
    assert delta("chatwire_time_to_first_token_seconds_count", model=MODEL) == 3
    assert reply.usage is not None
    assert delta("chatwire_completion_tokens_total", model=MODEL) >= 10  # 5 + 5 + the stream's tokens
    assert delta("chatwire_prompt_tokens_total", model=MODEL) >= 2 * reply.usage.prompt_tokens
    assert delta("chatwire_cached_prompt_tokens_total", model=MODEL) > 0  # the shared system prompt
    for gauge in ("chatwire_queued_requests", "chatwire_running_sequences", "chatwire_cached_prefixes"):
        assert (gauge, (("model", MODEL),)) in after
    assert value(after, "chatwire_cached_prefixes", model=MODEL) >= 1


def test_endpoint_picker_gauges_under_vllm_names(chatwire: Stack) -> None:
    """The gauges the Gateway API Inference Extension reads from a model server, as vLLM names and labels them:
    while a stream runs they show it and the KV cells it holds; when it ends they fall back to zero."""
    text = httpx.get(f"http://127.0.0.1:{chatwire.ports.metrics}/metrics", timeout=10).text
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
        assert f"# TYPE {name} gauge" in text
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 300, "stream": True, "n": 2}
    body["logit_bias"] = NO_END_BIAS  # no early end: the stream runs while we look
    with httpx.stream("POST", f"{chatwire.base_url}/chat/completions", json=body, timeout=120) as reply:
        lines = reply.iter_lines()
        for _ in range(3):
            next(lines)
        during = scrape(chatwire)
        # One request, two choices: vLLM counts requests; chatwire also reports the sequences.
        assert value(during, "vllm:num_requests_running", model_name=MODEL) == 1
        assert value(during, "chatwire_running_requests", model=MODEL) == 1
        assert value(during, "chatwire_running_sequences", model=MODEL) == 2
        assert value(during, "vllm:num_requests_waiting", model_name=MODEL) == 0
        kv_usage = value(during, "vllm:kv_cache_usage_perc", model_name=MODEL)
        assert 0 < kv_usage < 1 and value(during, "chatwire_kv_cache_usage_ratio", model=MODEL) == kv_usage
        for _ in lines:
            pass
    # The engine frees the sequences just after their last chunk: give it a moment.
    deadline = time.monotonic() + 5
    while value(after := scrape(chatwire), "vllm:num_requests_running", model_name=MODEL) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert value(after, "vllm:num_requests_running", model_name=MODEL) == 0
    # The finished stream's cells stay cached for prefix reuse, but they can be evicted: not "in use".
    assert value(after, "vllm:kv_cache_usage_perc", model_name=MODEL) == 0
    assert value(after, "chatwire_cached_prefixes", model=MODEL) >= 1


def test_envoy_stats_are_scrapable(chatwire: Stack) -> None:
    text = httpx.get(f"http://127.0.0.1:{chatwire.ports.admin}/stats/prometheus", timeout=10).text
    families = {f.name for f in text_string_to_metric_families(text)}
    assert "envoy_cluster_upstream_rq" in families or "envoy_cluster_upstream_rq_total" in families
    assert "envoy_cluster_health_check_success" in families
