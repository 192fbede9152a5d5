"""`make bench`, part two: replicas behind the edge, with and without cache affinity, and the balancer's options.

Conversations (multi-turn, each with its own ~350-token system prompt) on three replicas, each mode on a fresh
stack so no prefix cache carries over:

- `no_key` and `affinity` over HTTP (`prompt_cache_key` = the conversation), and `affinity_grpc`: the same
  conversations through the edge's internal gRPC listener, the key sent as `x-chatwire-affinity` metadata by the
  Python helper (clients/python).
- `mixed`: keyed conversations over gRPC while unkeyed one-shot requests keep arriving over HTTP, once per balancer
  option: the shipped one (one ring-hash cluster for every request, load bound 1.25x), the same with a 1.5x bound,
  and the design before it (two clusters over the same replicas: least request for unkeyed requests, a 1.5x ring
  for keyed ones, neither seeing the other's requests in flight).

Figures: prompt tokens the replicas evaluated (prompt - cached), the share served from the prefix cache, time to
first token (p50/p99), wall time; for `mixed`, also the unkeyed requests' TTFT and how evenly the requests in flight
were spread (sampled from Envoy's admin every 100 ms: the busiest replica's share against the mean). Adds
`affinity` to bench/results/results.json and re-renders BENCHMARKS.md.
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import yaml
from google.protobuf import json_format

import chatwire_client
import report
from chatwire.v1 import chat_completion_pb2, chat_service_pb2_grpc
from chatwire_server.edge import stack

MODEL = "smollm2-135m-instruct"
REPLICAS = 3
CONVERSATIONS = 12
TURNS = 6
CONCURRENCY = 6
REPLY_TOKENS = 16
# The mixed run: this many keyed conversations at once, and this many callers sending unkeyed requests meanwhile.
MIXED_CONVERSATIONS = 6
MIXED_UNKEYED_CALLERS = 3


def system_prompt(mode: str, conversation: int) -> str:
    """A ~350-token instruction block of the conversation's own (a tenant's assistant, say)."""
    rules = " ".join(f"Rule {n}: answer in plain words and keep to the topic of item {n}." for n in range(1, 26))
    return f"[{mode} / conversation {conversation}] You are a careful assistant. {rules}"


def turn_body(messages: list[dict[str, str]], key: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": REPLY_TOKENS,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    if key is not None:
        body["prompt_cache_key"] = key
    return body


def http_turn(client: httpx.Client, base_url: str, body: dict[str, Any]) -> tuple[str, float, dict[str, Any]]:
    """One streamed request over HTTP: its text, time to first token, usage."""
    started = time.monotonic()
    first, text, usage = None, [], None
    with client.stream("POST", f"{base_url}/chat/completions", json={**body, "stream": True}) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = first or time.monotonic()
                text.append(chunk["choices"][0]["delta"]["content"])
            usage = chunk.get("usage") or usage
    assert usage is not None and first is not None
    return "".join(text), first - started, usage


def grpc_turn(stub: chat_service_pb2_grpc.ChatServiceStub, body: dict[str, Any]) -> tuple[str, float, dict[str, Any]]:
    """One streamed request over gRPC (the helper's channel adds the affinity metadata)."""
    request = json_format.ParseDict(body, chat_completion_pb2.CreateChatCompletionRequest())
    started = time.monotonic()
    first, text, usage = None, [], None
    for chunk in stub.StreamChatCompletion(request, timeout=300):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.monotonic()
            text.append(chunk.choices[0].delta.content)
        if chunk.HasField("usage"):
            usage = json_format.MessageToDict(chunk.usage, preserving_proto_field_name=True)
    assert usage is not None and first is not None
    return "".join(text), first - started, usage


def converse(
    running: stack.Launched, mode: str, conversation: int, keyed: bool, over_grpc: bool
) -> list[dict[str, float]]:
    """One conversation, turn by turn; each turn's timing and usage."""
    messages: list[dict[str, str]] = [{"role": "system", "content": system_prompt(mode, conversation)}]
    key = f"conversation-{conversation}" if keyed else None
    turns = []
    with (
        httpx.Client(timeout=300) as client,
        chatwire_client.channel(f"127.0.0.1:{running.ports.grpc_edge}") as channel,
    ):
        stub = chat_service_pb2_grpc.ChatServiceStub(channel)
        base_url = f"http://127.0.0.1:{running.ports.http}/v1"
        for turn in range(TURNS):
            messages.append({"role": "user", "content": f"Tell me one fact about item {turn + 1}."})
            body = turn_body(messages, key)
            text, ttft, usage = grpc_turn(stub, body) if over_grpc else http_turn(client, base_url, body)
            messages.append({"role": "assistant", "content": text})
            cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
            turns.append({"ttft_s": ttft, "prompt_tokens": usage["prompt_tokens"], "cached_tokens": cached})
    return turns


def figures(turns: list[dict[str, float]], wall: float) -> dict[str, Any]:
    prompt = sum(t["prompt_tokens"] for t in turns)
    cached = sum(t["cached_tokens"] for t in turns)
    return {
        "requests": len(turns),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "evaluated_tokens": prompt - cached,
        "cached_share": round(cached / prompt, 3),
        **latencies("ttft", [t["ttft_s"] for t in turns]),
        "wall_s": round(wall, 1),
    }


def latencies(name: str, seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        f"{name}_p50_ms": round(1000 * statistics.median(ordered), 1),
        f"{name}_p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
    }


def run_mode(mode: str, work: Path, keyed: bool, over_grpc: bool) -> dict[str, Any]:
    """A fresh three-replica stack, the conversations on it, its figures."""
    with stack.launched(work, mode, REPLICAS) as running:
        started = time.monotonic()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            work_items = pool.map(lambda n: converse(running, mode, n, keyed, over_grpc), range(CONVERSATIONS))
            turns = [t for c in work_items for t in c]
        wall = time.monotonic() - started
    return figures(turns, wall)


class InFlight:
    """Samples Envoy's requests in flight per replica (summed over its clusters) every 100 ms."""

    def __init__(self, admin_port: int) -> None:
        self._admin_port = admin_port
        self._stop = threading.Event()
        self.samples: list[list[int]] = []
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            per_host: dict[str, int] = {}
            for hosts in stack.replica_hosts(self._admin_port, "rq_active", timeout=2).values():
                for address, active in hosts.items():
                    per_host[address] = per_host.get(address, 0) + int(active)
            self.samples.append(sorted(per_host.values()))

    def stop(self) -> dict[str, float]:
        """How evenly they were spread while at least one request per replica was in flight: the busiest
        replica's count against the mean (1.0 is even), mean and p95 over samples, and the peak on one replica."""
        self._stop.set()
        self._thread.join()
        busy = [s for s in self.samples if sum(s) >= REPLICAS]
        ratios = sorted(max(s) / (sum(s) / len(s)) for s in busy)
        return {
            "busiest_over_mean": round(statistics.mean(ratios), 2) if ratios else 0.0,
            "busiest_over_mean_p95": round(ratios[int(0.95 * (len(ratios) - 1))], 2) if ratios else 0.0,
            "peak_on_one_replica": max((max(s) for s in self.samples if s), default=0),
        }


def run_mixed(option: str, work: Path, envoy_config: Callable[[str], str] | None) -> dict[str, Any]:
    """Keyed conversations over gRPC while unkeyed one-shot HTTP requests keep arriving, on `option`'s edge."""
    with stack.launched(work, f"mixed-{option}", REPLICAS, envoy_config=envoy_config) as running:
        in_flight = InFlight(running.ports.admin)
        done = threading.Event()
        unkeyed: list[float] = []

        def unkeyed_caller(caller: int) -> None:
            base_url = f"http://127.0.0.1:{running.ports.http}/v1"
            with httpx.Client(timeout=300) as client:
                n = 0
                while not done.is_set():
                    question = f"[caller {caller}, question {n}] Name a fruit and a colour that go together."
                    _, ttft, _ = http_turn(client, base_url, turn_body([{"role": "user", "content": question}], None))
                    unkeyed.append(ttft)
                    n += 1

        started = time.monotonic()
        with ThreadPoolExecutor(MIXED_CONVERSATIONS + MIXED_UNKEYED_CALLERS) as pool:
            callers = [pool.submit(unkeyed_caller, c) for c in range(MIXED_UNKEYED_CALLERS)]
            conversations = [
                pool.submit(converse, running, f"mixed-{option}", n, True, True) for n in range(MIXED_CONVERSATIONS)
            ]
            turns = [t for c in conversations for t in c.result()]
            wall = time.monotonic() - started
            done.set()
            for caller in callers:
                caller.result()
        spread = in_flight.stop()
    return {
        "keyed": figures(turns, wall),
        "unkeyed": {"requests": len(unkeyed), **latencies("ttft", unkeyed)},
        **spread,
    }


def ring_bound(factor: int) -> Callable[[str], str]:
    """The shipped edge with another load bound on its ring."""

    def rewrite(rendered: str) -> str:
        config = yaml.safe_load(rendered)
        for cluster in config["static_resources"]["clusters"]:
            cluster["common_lb_config"]["consistent_hashing_lb_config"]["hash_balance_factor"] = factor
        return yaml.safe_dump(config)

    return rewrite


def two_clusters(rendered: str) -> str:
    """The design before one balancer view: unkeyed requests to a least-request cluster, keyed ones to a 1.5x ring
    over the same replicas, each cluster counting only its own requests in flight."""
    config = yaml.safe_load(rendered)
    resources = config["static_resources"]
    ring = resources["clusters"][0]
    ring["common_lb_config"]["consistent_hashing_lb_config"]["hash_balance_factor"] = 150
    least = copy.deepcopy(ring)
    least.update(name="chatwire_grpc_least", lb_policy="LEAST_REQUEST")
    least["load_assignment"]["cluster_name"] = "chatwire_grpc_least"
    del least["common_lb_config"]
    resources["clusters"].append(least)
    # Least request also counted requests waiting for a connection (Envoy issue 44989), as it was configured.
    config["layered_runtime"] = {
        "layers": [
            {
                "name": "static",
                "static_layer": {"envoy.reloadable_features.least_request_lb_count_pending_requests": True},
            }
        ]
    }
    for listener in resources["listeners"]:
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        for host in manager["route_config"]["virtual_hosts"]:
            routes = []
            for route in host["routes"]:
                if route["match"].get("prefix") == "/chatwire.v1.ChatService/":
                    keyed = copy.deepcopy(route)
                    keyed["match"]["headers"] = [{"name": "x-chatwire-affinity", "present_match": True}]
                    routes.append(keyed)
                    route = copy.deepcopy(route)
                    route["route"]["cluster"] = "chatwire_grpc_least"
                    del route["route"]["hash_policy"]
                routes.append(route)
            host["routes"] = routes
    return yaml.safe_dump(config)


MIXED_OPTIONS: dict[str, Callable[[str], str] | None] = {
    "one_ring_1.25x": None,
    "one_ring_1.5x": ring_bound(150),
    "two_clusters": two_clusters,
}


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="chatwire-bench-affinity-"))
    modes = {}
    for mode, keyed, over_grpc in (("no_key", False, False), ("affinity", True, False), ("affinity_grpc", True, True)):
        print(f"replicas, {mode}:", flush=True)
        modes[mode] = run_mode(mode, work, keyed, over_grpc)
        print(f"    {modes[mode]}", flush=True)
    mixed = {}
    for option, envoy_config in MIXED_OPTIONS.items():
        print(f"replicas, mixed keyed (gRPC) and unkeyed (HTTP), {option}:", flush=True)
        mixed[option] = run_mixed(option, work, envoy_config)
        print(f"    {mixed[option]}", flush=True)
    report.save_section(
        "affinity",
        {
            "replicas": REPLICAS,
            "conversations": CONVERSATIONS,
            "turns": TURNS,
            "concurrency": CONCURRENCY,
            "reply_tokens": REPLY_TOKENS,
            "mixed_conversations": MIXED_CONVERSATIONS,
            "mixed_unkeyed_callers": MIXED_UNKEYED_CALLERS,
            "engine_threads": int(stack.replica_env(REPLICAS)["CHATWIRE_ENGINE_THREADS"]),
            "cpu": report.cpu_name() if hasattr(report, "cpu_name") else "",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "modes": modes,
            "mixed": mixed,
        },
    )
    print(f"wrote the affinity figures to {report.RESULTS} (logs in {work})")


if __name__ == "__main__":
    main()
