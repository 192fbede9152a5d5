"""Three replicas sharing their per-key budgets in a real redis-server on loopback: a key's requests and tokens per
minute hold across replicas, for HTTP callers and gRPC callers of the edge's internal listener alike; the store
failing (stopped, killed) costs at most its timeout, and shared counting returns once it is back."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format

from chatwire.v1 import chat_completion_pb2 as pb
from chatwire.v1 import chat_service_pb2_grpc
from chatwire_server.edge import stack
from chatwire_server.errors import RateLimitError, ServiceUnavailableError
from chatwire_server.limits import Limiter, Limits, Reservation
from chatwire_server.limits.shared import RedisBuckets
from conftest import (
    MODEL,
    NO_END_BIAS,
    Redis,
    Stack,
    free_ports,
    make_run,
    make_run_env,
    metric,
    run_redis,
    run_stack,
    small_replicas,
)

pytestmark = pytest.mark.scaleout

RPM, TPM = 6, 300
# One key per test: the budgets are per key, and tests run in any order on the one stack.
KEYS = ("sk-fleet-rpm", "sk-fleet-headers", "sk-fleet-tpm", "sk-fleet-stopped", "sk-fleet-killed", "sk-fleet-restart")
HI = [{"role": "user", "content": "Hi"}]


class Fleet:
    def __init__(self, running: Stack, redis: Redis) -> None:
        self.running = running
        self.redis = redis


@pytest.fixture(scope="module")
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("fleet")
    with run_redis(work / "redis.log") as redis:
        env = {
            "CHATWIRE_API_KEYS": ",".join(KEYS),
            "CHATWIRE_RATE_LIMIT_RPM": str(RPM),
            "CHATWIRE_RATE_LIMIT_TPM": str(TPM),
            "CHATWIRE_REDIS_URL": redis.url,
        }
        with run_stack(request, small_replicas(work), server_env=env, replicas=3) as running:
            yield Fleet(running, redis)


def over_http(running: Stack, key: str, **body: Any) -> tuple[int, dict[str, str], dict[str, Any]]:
    reply = httpx.post(
        f"{running.base_url}/chat/completions",
        json={"model": MODEL, "messages": HI, "max_tokens": 2, **body},
        headers={"authorization": f"Bearer {key}"},
        timeout=60,
    )
    return reply.status_code, dict(reply.headers), reply.json()


def over_grpc(target: str, key: str, **body: Any) -> tuple[int, dict[str, str], dict[str, Any]]:
    """A unary call; the HTTP status it would have been, its metadata, and its reply or error body."""
    request = json_format.ParseDict(
        {"model": MODEL, "messages": HI, "max_tokens": 2, **body}, pb.CreateChatCompletionRequest()
    )
    with grpc.insecure_channel(target) as channel:
        call = chat_service_pb2_grpc.ChatServiceStub(channel).CreateChatCompletion.with_call
        try:
            reply, state = call(request, metadata=[("authorization", f"Bearer {key}")], timeout=60)
        except grpc.RpcError as error:
            metadata = dict(error.trailing_metadata())  # type: ignore[attr-defined]
            status = 429 if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else 500  # type: ignore[attr-defined]
            return status, metadata, json.loads(metadata.get("x-chatwire-error", "{}"))
    return 200, dict(state.initial_metadata()), json_format.MessageToDict(reply, preserving_proto_field_name=True)


def test_a_keys_requests_per_minute_hold_across_replicas_for_http_and_grpc_callers(fleet: Fleet) -> None:
    running, key = fleet.running, KEYS[0]
    calls = [
        (lambda: over_http(running, key)) if n % 2 == 0 else (lambda: over_grpc(running.grpc_edge_target, key))
        for n in range(24)
    ]
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda call: call(), calls))
    elapsed = time.monotonic() - started
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 429}, results
    served = statuses.count(200)
    # RPM 6: six at once, and one more per 10 s that passes (the test takes a few seconds).
    assert RPM <= served <= RPM + int(elapsed * RPM / 60) + 1, (served, elapsed)
    # Both kinds of caller drew on it (calls alternate; the first four run at once, the last ones find it spent).
    kinds = ["http" if n % 2 == 0 else "grpc" for n in range(24)]
    assert {kind for kind, s in zip(kinds, statuses, strict=True) if s == 200} == {"http", "grpc"}, statuses
    assert {kind for kind, s in zip(kinds, statuses, strict=True) if s == 429} == {"http", "grpc"}, statuses
    refused = [body["error"] for status, _, body in results if status == 429]
    assert all(error["code"] == "rate_limit_exceeded" and error["type"] == "requests" for error in refused), refused
    # Whichever replicas answered (the unkeyed requests spread over them), they counted one budget.
    assert len({metadata["x-chatwire-replica"] for _, metadata, _ in results}) >= 2, results


def test_every_replica_answers_from_the_same_budget(fleet: Fleet) -> None:
    key = KEYS[1]
    remaining = []
    for replica in fleet.running.replicas:  # each replica called on its own port
        status, metadata, _ = over_grpc(f"127.0.0.1:{replica.grpc}", key)
        assert status == 200 and metadata["x-chatwire-replica"] == replica.name
        remaining.append(int(metadata["x-ratelimit-remaining-requests"]))
        assert metadata["x-ratelimit-limit-requests"] == str(RPM)
    assert remaining == [RPM - 1, RPM - 2, RPM - 3], remaining
    # And a 429 says the same, with when to retry, from any replica.
    for _ in range(3):
        over_http(fleet.running, key)
    status, headers, body = over_http(fleet.running, key)
    assert status == 429 and headers["x-ratelimit-remaining-requests"] == "0" and int(headers["retry-after"]) >= 1
    assert body["error"]["type"] == "requests"


def test_a_token_budget_holds_with_eight_concurrent_streams(fleet: Fleet) -> None:
    key = KEYS[2]
    body = {
        "model": MODEL,
        "messages": HI,
        "max_tokens": 100,
        "logit_bias": NO_END_BIAS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    results: list[tuple[int, Any]] = []
    start = threading.Barrier(8)

    def stream() -> None:
        start.wait()
        with httpx.stream(
            "POST",
            f"{fleet.running.base_url}/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {key}"},
            timeout=120,
        ) as reply:
            text = reply.read().decode()
            if reply.status_code != 200:
                results.append((reply.status_code, json.loads(text)))
                return
            chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
            results.append((200, chunks[-1]["usage"]))

    started = time.monotonic()
    threads = [threading.Thread(target=stream) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    served = [usage for status, usage in results if status == 200]
    refused = [reply["error"] for status, reply in results if status == 429]
    assert len(served) + len(refused) == 8, results
    # Each stream reserves its prompt's estimate + 100 at admission: two fit in 300, the rest wait.
    assert 1 <= len(served) <= 3 and all(error["type"] == "tokens" for error in refused), results
    used = sum(usage["total_tokens"] for usage in served)
    assert used <= TPM + elapsed * TPM / 60, (used, elapsed)


def replica_metric(fleet: Fleet, name: str) -> list[float]:
    return [metric(replica.metrics, name) or 0.0 for replica in fleet.running.replicas]


def timed(call: Any) -> tuple[float, Any]:
    started = time.monotonic()
    result = call()
    return time.monotonic() - started, result


def test_the_store_failing_costs_at_most_its_timeout_and_sharing_returns(fleet: Fleet) -> None:
    running, redis = fleet.running, fleet.redis
    assert redis.process is not None
    # Stopped (a hung store: connections open, nothing answers) and then killed (connections refused): every
    # request is still served, by each replica's own budget, none slower than the store's bound (100 ms) + 1 s.
    for outage, key in ((signal.SIGSTOP, KEYS[3]), (signal.SIGKILL, KEYS[4])):
        redis.process.send_signal(outage)
        replies = [timed(lambda key=key: over_http(running, key)) for _ in range(4)]
        assert [status for _, (status, _, _) in replies] == [200] * 4, replies
        assert max(seconds for seconds, _ in replies) < 0.1 + 1.0, replies
        assert sum(replica_metric(fleet, "chatwire_rate_limit_store_failures_total")) >= 1
        if outage == signal.SIGSTOP:
            redis.process.send_signal(signal.SIGCONT)
            time.sleep(1.2)  # past the store's retry interval: the next request on each replica tries it again
    # Back (empty: nothing is saved, so every budget is full again) and shared again: one key's requests, one per
    # replica in turn, count down one budget and the seventh is refused.
    redis.process.wait(10)
    redis.start()
    time.sleep(1.2)
    results = [over_grpc(f"127.0.0.1:{running.replicas[n % 3].grpc}", KEYS[5]) for n in range(RPM + 1)]
    assert [status for status, _, _ in results] == [200] * RPM + [429], results
    assert replica_metric(fleet, "chatwire_rate_limit_store_up") == [1.0, 1.0, 1.0]


def test_a_store_that_cannot_be_reached_fails_fast_open_or_closed() -> None:
    # Nothing listens on this port: each policy answers within the bound, and failing open counts locally.
    url = f"redis://127.0.0.1:{stack.free_port()}/0"
    limits = Limits(requests_per_minute=2)

    async def attempts() -> None:
        opened = Limiter(limits, RedisBuckets(url, 0.05))
        closed = Limiter(limits, RedisBuckets(url, 0.05), fail_closed=True)
        assert (await opened.admit("k", Reservation(0, 1))).headers
        await opened.admit("k", Reservation(0, 1))
        with pytest.raises(RateLimitError):
            await opened.admit("k", Reservation(0, 1))
        with pytest.raises(ServiceUnavailableError):
            await closed.admit("k", Reservation(0, 1))

    started = time.monotonic()
    asyncio.run(attempts())
    assert time.monotonic() - started < 0.5


def test_make_run_with_replicas_and_a_limit_starts_its_own_store_and_stops_it(tmp_path: Path) -> None:
    """`CHATWIRE_REPLICAS=2 make run` with a rate limit and no store named: a redis-server on loopback, shared by
    both replicas, stopped with the stack."""
    ports = free_ports(("HTTP", "GRPC_EDGE", "ADMIN", "REDIS"))
    # Replica i listens on the gRPC and metrics ports + i.
    ports |= {"GRPC": stack.free_ports_in_a_row(2), "METRICS": stack.free_ports_in_a_row(2)}
    env = make_run_env(ports, CHATWIRE_REPLICAS="2", CHATWIRE_API_KEYS="sk-run", CHATWIRE_RATE_LIMIT_RPM="2")
    env.pop("CHATWIRE_REDIS_URL", None)
    log_path = tmp_path / "run.log"
    with make_run(env, log_path) as launcher:
        assert f"redis://127.0.0.1:{ports['REDIS']}/0" in log_path.read_text()
        # Both replicas count one budget: 2 per minute, whichever replica serves (one call to each's own port).
        key = "sk-run"
        results = [over_grpc(f"127.0.0.1:{ports['GRPC'] + n}", key)[0] for n in range(2)]
        results.append(over_grpc(f"127.0.0.1:{ports['GRPC_EDGE']}", key)[0])
        assert results == [200, 200, 429], results
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(60)
    with pytest.raises(OSError):  # the store went with the stack
        socket.create_connection(("127.0.0.1", ports["REDIS"]), timeout=2).close()


def test_a_reservation_is_at_most_a_minutes_budget_and_a_passed_on_request_is_given_back() -> None:
    limits = Limits(requests_per_minute=3, tokens_per_minute=100)
    # A huge request (4 MiB, n = 128) reserves the whole minute, not a day's worth.
    assert limits.reservation(4 << 20, 100, 128) == Reservation(100, 100)

    async def attempts() -> None:
        limiter = Limiter(limits)
        first = await limiter.admit("k", Reservation(10, 20))
        assert dict(first.headers)["x-ratelimit-remaining-requests"] == "2"
        first.passed_on = True  # refused before any work, retried by the edge on another replica
        await first.settle()
        second = await limiter.admit("k", Reservation(10, 20))
        assert dict(second.headers)["x-ratelimit-remaining-requests"] == "2"  # the first was given back
        assert dict(second.headers)["x-ratelimit-remaining-tokens"] == "80"

    asyncio.run(attempts())
