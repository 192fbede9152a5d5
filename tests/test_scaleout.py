"""Replicas behind the one Envoy edge (three gRPC servers on loopback standing in for three machines): spreading,
cache affinity by `prompt_cache_key`, retries of a full replica's refusal on another, draining; for HTTP callers and
for gRPC callers of the edge's internal listener (the Go, TypeScript and Python helpers)."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format

import chatwire_client
from chatwire.v1 import chat_completion_pb2, chat_service_pb2_grpc
from chatwire_server.edge import stack
from conftest import CONFORMANCE, MODEL, NO_END, Stack, assert_valid, metric, parse_sse, run_stack, small_replicas

pytestmark = pytest.mark.scaleout

HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def replicas(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Three replicas behind the edge."""
    with run_stack(request, small_replicas(tmp_path_factory.mktemp("replicas")), replicas=3) as running:
        yield running


def chat(running: Stack, **body: Any) -> httpx.Response:
    request = {"model": MODEL, "messages": HI, "max_tokens": 4, **body}
    return httpx.post(f"{running.base_url}/chat/completions", json=request, timeout=120)


def replica_of(reply: httpx.Response) -> str:
    name = reply.headers.get("x-chatwire-replica")
    assert name, dict(reply.headers)
    return name


def envoy_counter(running: Stack, name: str) -> int:
    stats = httpx.get(f"http://127.0.0.1:{running.ports.admin}/stats?filter=^{name}$&format=json", timeout=10)
    values = [s.get("value", 0) for s in stats.json()["stats"] if s.get("name") == name]
    return int(values[0]) if values else 0


def grpc_request(**body: Any) -> chat_completion_pb2.CreateChatCompletionRequest:
    return json_format.ParseDict(
        {"model": MODEL, "messages": HI, "max_tokens": 4, **body}, chat_completion_pb2.CreateChatCompletionRequest()
    )


def key_on(running: Stack, replica: str) -> str:
    """A `prompt_cache_key` that the ring sends to `replica`."""
    for n in range(200):
        key = f"tenant-{n}"
        if replica_of(chat(running, prompt_cache_key=key, max_tokens=1)) == replica:
            return key
    raise AssertionError(f"no key maps to {replica}")


def test_concurrent_streams_spread_over_all_replicas(replicas: Stack) -> None:
    served: list[str] = []
    failures: list[str] = []
    start = threading.Barrier(12)

    def stream() -> None:
        body = {"model": MODEL, "messages": HI, "max_tokens": 24, "stream": True, **NO_END}
        start.wait()
        with httpx.stream("POST", f"{replicas.base_url}/chat/completions", json=body, timeout=180) as reply:
            text = reply.read().decode()
            if reply.status_code != 200:
                failures.append(f"{reply.status_code} {text[:200]}")
                return
            events = parse_sse(text)
            assert events[-1] == "[DONE]"
            for chunk in events[:-1]:
                assert_valid(chunk, "CreateChatCompletionStreamResponse")
            served.append(replica_of(reply))

    threads = [threading.Thread(target=stream) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures and len(served) == 12, failures
    assert set(served) == {r.name for r in replicas.replicas}, served


def test_a_conversation_stays_on_the_replica_that_caches_it(replicas: Stack) -> None:
    messages: list[dict[str, str]] = [
        {"role": "system", "content": "You are a terse assistant. " * 20},
        {"role": "user", "content": "Name a colour."},
    ]
    served, cached = [], []
    for turn in range(10):
        reply = chat(replicas, messages=messages, max_tokens=8, prompt_cache_key="conversation-42")
        assert reply.status_code == 200, reply.text
        body = reply.json()
        served.append(replica_of(reply))
        cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
        messages += [body["choices"][0]["message"], {"role": "user", "content": f"And another one ({turn})."}]
    assert len(set(served)) == 1, served
    assert all(tokens > 0 for tokens in cached[1:]), cached


def test_grpc_streams_through_the_edge_from_go_and_typescript_spread_over_all_replicas(
    built_clients: None, replicas: Stack
) -> None:
    payload = {
        "address": replicas.grpc_edge_target,
        "rpc": "stream",
        "request": {"model": MODEL, "messages": HI, "max_tokens": 24, **NO_END},
    }
    callers = [
        subprocess.Popen(
            CONFORMANCE[language], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for language in ("go", "typescript") * 6
    ]
    # All twelve calls at once (each process waits for its call on stdin): in flight together, the load bound
    # spreads them.
    for caller in callers:
        assert caller.stdin is not None
        caller.stdin.write(json.dumps(payload))
        caller.stdin.close()
    results = []
    for caller in callers:
        assert caller.stdout is not None and caller.stderr is not None
        out, err = caller.stdout.read(), caller.stderr.read()
        assert caller.wait(180) == 0, err
        results.append(json.loads(out))
    assert all("error" not in r and r["chunks"][-1]["choices"][0]["finish_reason"] == "length" for r in results), (
        results
    )
    assert {r["replica"] for r in results} == {r.name for r in replicas.replicas}, [r["replica"] for r in results]


def test_a_grpc_conversation_with_an_affinity_key_stays_on_the_replica_that_caches_it(replicas: Stack) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a terse assistant. " * 20},
        {"role": "user", "content": "Name a colour."},
    ]
    served, cached = [], []
    # The Python helper's channel sends the request's prompt_cache_key as `x-chatwire-affinity` metadata.
    with chatwire_client.channel(replicas.grpc_edge_target) as channel:
        stub = chat_service_pb2_grpc.ChatServiceStub(channel)
        for turn in range(6):
            request = grpc_request(messages=messages, max_tokens=8, prompt_cache_key="grpc-conversation-7")
            reply, call = stub.CreateChatCompletion.with_call(request, timeout=60)
            served.append(chatwire_client.replica(call))
            cached.append(reply.usage.prompt_tokens_details.cached_tokens)
            answer = reply.choices[0].message.content.string_value
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": f"Another ({turn})."}]
    assert len(set(served)) == 1 and served[0] in {r.name for r in replicas.replicas}, served
    assert all(tokens > 0 for tokens in cached[1:]), cached


def test_keys_pick_replicas_and_other_requests_balance(replicas: Stack) -> None:
    by_key = {key: {replica_of(chat(replicas, user=key)) for _ in range(3)} for key in ("alice", "bob", "carol")}
    assert all(len(served) == 1 for served in by_key.values()), by_key  # each key sticks
    spread = {replica_of(chat(replicas, user=f"user-{n}")) for n in range(12)}
    assert len(spread) >= 2, spread  # and keys spread


def test_the_access_log_names_the_replica(replicas: Stack) -> None:
    reply = chat(replicas)
    request_id = reply.headers["x-request-id"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in replicas.envoy_log.read_text().splitlines():
            if request_id in line:
                record = json.loads(line)
                assert record["replica"] == replica_of(reply)
                assert record["upstream"].endswith(f":{replica_of(reply).rsplit(':', 1)[1]}")
                return
        time.sleep(0.2)
    raise AssertionError("no access-log line for the request")


@pytest.fixture(scope="module")
def one_slot_replicas(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Three replicas that each decode one sequence and queue nothing: a second request is a 429."""
    config = small_replicas(tmp_path_factory.mktemp("one-slot"), max_sequences=1, max_queued_requests=0)
    with run_stack(request, config, replicas=3) as running:
        yield running


def test_a_full_replica_refusal_is_retried_on_another(one_slot_replicas: Stack) -> None:
    running = one_slot_replicas
    full = running.replicas[0]
    key = key_on(running, full.name)
    # Fill its only slot behind the edge's back (straight to its gRPC port): Envoy still counts it idle, so the
    # ring's load bound does not steer around it and the replica's own refusal is what moves the request.
    long = json_format.ParseDict(
        {"model": MODEL, "messages": HI, "max_tokens": 400, **NO_END}, chat_completion_pb2.CreateChatCompletionRequest()
    )

    def hold() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{full.grpc}") as channel:
            for _ in chat_service_pb2_grpc.ChatServiceStub(channel).StreamChatCompletion(long, timeout=120):
                pass

    holder = threading.Thread(target=hold)
    holder.start()
    deadline = time.monotonic() + 30
    while (metric(full.metrics, "chatwire_running_requests") or 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    retried = envoy_counter(running, "cluster.chatwire_grpc.upstream_rq_retry_success")
    reply = chat(running, prompt_cache_key=key)
    # A gRPC caller of the internal listener with the same key: retried the same way.
    with chatwire_client.channel(running.grpc_edge_target) as channel:
        stub = chat_service_pb2_grpc.ChatServiceStub(channel)
        _, call = stub.CreateChatCompletion.with_call(grpc_request(prompt_cache_key=key), timeout=60)
    holder.join()
    assert reply.status_code == 200, reply.text
    assert replica_of(reply) != full.name and chatwire_client.replica(call) != full.name
    assert envoy_counter(running, "cluster.chatwire_grpc.upstream_rq_retry_success") == retried + 2


def test_when_every_replica_is_full_the_client_gets_the_429(one_slot_replicas: Stack) -> None:
    running = one_slot_replicas
    long = json_format.ParseDict(
        {"model": MODEL, "messages": HI, "max_tokens": 400, **NO_END}, chat_completion_pb2.CreateChatCompletionRequest()
    )
    channels = [grpc.insecure_channel(f"127.0.0.1:{r.grpc}") for r in running.replicas]
    streams = [chat_service_pb2_grpc.ChatServiceStub(c).StreamChatCompletion(long, timeout=120) for c in channels]
    try:
        for stream in streams:
            next(stream)  # each replica's one slot is taken
        reply = chat(running)
        assert reply.status_code == 429, reply.text
        assert reply.json()["error"]["code"] == "rate_limit_exceeded" and reply.headers["retry-after"] == "1"
        # Tried twice (once elsewhere), and the retry marker stays inside the edge.
        assert "x-chatwire-retry-elsewhere" not in reply.headers
    finally:
        for stream in streams:
            stream.cancel()
        for channel in channels:
            channel.close()


def healthy_hosts(running: Stack, address_suffix: str) -> list[str]:
    """Envoy's clusters in which the replica at `...address_suffix` is healthy."""
    healthy = stack.healthy_replicas(running.ports.admin)
    return [cluster for cluster, addresses in healthy.items() if any(a.endswith(address_suffix) for a in addresses)]


@pytest.fixture
def disposable(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """Three replicas, one of which the test will stop or kill."""
    with run_stack(request, small_replicas(tmp_path), replicas=3) as running:
        yield running


def test_a_draining_replica_finishes_its_streams_and_takes_no_new_requests(disposable: Stack) -> None:
    draining = disposable.replicas[0]
    key = key_on(disposable, draining.name)
    body = {"model": MODEL, "messages": HI, "max_tokens": 200, "stream": True, "prompt_cache_key": key, **NO_END}
    with httpx.stream("POST", f"{disposable.base_url}/chat/completions", json=body, timeout=120) as stream:
        assert replica_of(stream) == draining.name
        lines = stream.iter_lines()
        for _ in range(3):
            next(lines)
        assert draining.process is not None
        draining.process.send_signal(signal.SIGTERM)
        # It says NOT_SERVING and keeps serving until Envoy's health checks take it out of both clusters...
        deadline = time.monotonic() + 15
        while healthy_hosts(disposable, f":{draining.grpc}") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not healthy_hosts(disposable, f":{draining.grpc}")
        time.sleep(stack.HOSTS_SETTLE_S)  # Envoy's worker threads act on it a moment after its admin API shows it
        # ...then new requests, with its key and without, are served by the others while its stream goes on.
        during = [chat(disposable, prompt_cache_key=key), chat(disposable), chat(disposable, stream=True)]
        with chatwire_client.channel(disposable.grpc_edge_target) as channel:
            stub = chat_service_pb2_grpc.ChatServiceStub(channel)
            grpc_during = [
                chatwire_client.replica(stub.CreateChatCompletion.with_call(grpc_request(**body), timeout=60)[1])
                for body in ({"prompt_cache_key": key}, {})
            ]
        rest = "\n".join(lines)
    assert [r.status_code for r in during] == [200, 200, 200], [r.text for r in during]
    assert draining.name not in {replica_of(r) for r in during} | set(grpc_during), grpc_during
    # Its own stream ran to the end it asked for.
    assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in rest, rest[-300:]
    assert draining.process.wait(30) == 0


def test_a_killed_replica_is_routed_around(disposable: Stack) -> None:
    victim, *others = disposable.replicas
    assert victim.process is not None
    key = key_on(disposable, victim.name)
    long = {"max_tokens": 2000, **NO_END}  # about 20 s: far beyond the test
    # The load bound lets one replica take only its share of what is in flight: a long stream on each other
    # replica first, so that the victim may hold three calls.
    fillers = [
        httpx.stream(
            "POST",
            f"{disposable.base_url}/chat/completions",
            json={
                "model": MODEL,
                "messages": HI,
                "stream": True,
                "prompt_cache_key": key_on(disposable, r.name),
                **long,
            },
            timeout=60,
        )
        for r in others
    ]
    with fillers[0] as first, fillers[1] as second:
        assert {replica_of(first), replica_of(second)} == {r.name for r in others}
        body = {"model": MODEL, "messages": HI, "stream": True, "prompt_cache_key": key, **long}
        with (
            httpx.stream("POST", f"{disposable.base_url}/chat/completions", json=body, timeout=30) as stream,
            chatwire_client.channel(disposable.grpc_edge_target) as channel,
            chatwire_client.channel(disposable.grpc_edge_target) as unary_channel,
        ):
            assert replica_of(stream) == victim.name
            lines = stream.iter_lines()
            next(lines)
            stub = chat_service_pb2_grpc.ChatServiceStub(channel)
            grpc_stream = stub.StreamChatCompletion(grpc_request(prompt_cache_key=key, **long), timeout=30)
            next(grpc_stream)
            assert chatwire_client.replica(grpc_stream) == victim.name
            # Another caller, on its own connection.
            other_caller = chat_service_pb2_grpc.ChatServiceStub(unary_channel)
            unary = other_caller.CreateChatCompletion.future(grpc_request(prompt_cache_key=key, **long), timeout=30)
            deadline = time.monotonic() + 10
            while (metric(victim.metrics, "chatwire_running_requests") or 0) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert metric(victim.metrics, "chatwire_running_requests") == 3
            victim.process.kill()
            # Every call in flight on it ends at once, never hangs. The HTTP stream is cut (no error event yet); a
            # gRPC call whose reply had not begun (unary) is UNAVAILABLE; a gRPC stream that had begun is reset by
            # Envoy, which gRPC reports as INTERNAL (RST_STREAM) (docs/design.md, "Internal gRPC through the edge").
            with pytest.raises(httpx.RemoteProtocolError):
                for _ in lines:
                    pass
            assert unary.exception(timeout=5).code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[union-attr]
            with pytest.raises(grpc.RpcError) as reset:
                for _ in grpc_stream:
                    pass
            assert reset.value.code() == grpc.StatusCode.INTERNAL  # type: ignore[attr-defined]
    # New requests, its key's included, go to the others: connection failures are retried elsewhere, and
    # Envoy takes the replica out (outlier ejection or failed health checks).
    replies = [chat(disposable, prompt_cache_key=key)] + [chat(disposable) for _ in range(9)]
    assert [r.status_code for r in replies] == [200] * 10, [r.text for r in replies]
    assert victim.name not in {replica_of(r) for r in replies}
    with chatwire_client.channel(disposable.grpc_edge_target) as channel:
        stub = chat_service_pb2_grpc.ChatServiceStub(channel)
        served = [
            stub.CreateChatCompletion.with_call(grpc_request(prompt_cache_key=key), timeout=30)[1] for _ in range(3)
        ]
    assert victim.name not in {chatwire_client.replica(call) for call in served}
    deadline = time.monotonic() + 10
    while healthy_hosts(disposable, f":{victim.grpc}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not healthy_hosts(disposable, f":{victim.grpc}")
