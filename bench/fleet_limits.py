"""Per-key budgets on three replicas, as a new user meets them (issue 23's probe), with figures to quote:

- requests per minute 6: of 24 quick requests from one key (4 at a time, HTTP and gRPC alternating), how many
  were served, with the budgets shared in redis-server and, for comparison, kept by each replica;
- tokens per minute 300: 8 streams of up to 100 tokens opened at once by one key, the tokens they used;
- the store failing: the slowest request while redis-server is SIGSTOPped, then SIGKILLed.

    PYTHONPATH=services:build/gen/python:clients/python .venv/bin/python bench/fleet_limits.py
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
from google.protobuf import json_format

import report
from chatwire.v1 import chat_completion_pb2, chat_service_pb2_grpc
from chatwire_server.edge import stack

MODEL = "smollm2-135m-instruct"
KEY = "sk-fleet"
HI = [{"role": "user", "content": "Hi"}]
NO_END = {"0": -100, "2": -100, "4": -100}


def http_call(running: stack.Launched, **body: Any) -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{running.ports.http}/v1/chat/completions",
        json={"model": MODEL, "messages": HI, "max_tokens": 2, **body},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=120,
    )


def grpc_call(running: stack.Launched) -> int:
    request = json_format.ParseDict(
        {"model": MODEL, "messages": HI, "max_tokens": 2}, chat_completion_pb2.CreateChatCompletionRequest()
    )
    with grpc.insecure_channel(f"127.0.0.1:{running.ports.grpc_edge}") as channel:
        try:
            chat_service_pb2_grpc.ChatServiceStub(channel).CreateChatCompletion(
                request, metadata=[("authorization", f"Bearer {KEY}")], timeout=60
            )
        except grpc.RpcError as error:
            return 429 if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else 500  # type: ignore[attr-defined]
    return 200


def requests_served(running: stack.Launched) -> int:
    calls = [
        (lambda: http_call(running).status_code) if n % 2 == 0 else (lambda: grpc_call(running)) for n in range(24)
    ]
    with ThreadPoolExecutor(4) as pool:
        return [status for status in pool.map(lambda call: call(), calls)].count(200)


def tokens_used(running: stack.Launched) -> dict[str, int]:
    served: list[int] = []
    start = threading.Barrier(8)

    def stream() -> None:
        body = {"max_tokens": 100, "logit_bias": NO_END, "stream": True, "stream_options": {"include_usage": True}}
        start.wait()
        reply = http_call(running, **body)
        if reply.status_code == 200:
            chunks = [json.loads(line[6:]) for line in reply.text.splitlines() if line.startswith("data: {")]
            served.append(chunks[-1]["usage"]["total_tokens"])

    threads = [threading.Thread(target=stream) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"streams_served": len(served), "tokens_used": sum(served)}


def slowest_during(redis: Any, outage: signal.Signals, running: stack.Launched) -> float:
    redis.send_signal(outage)
    slowest = 0.0
    for _ in range(6):
        started = time.monotonic()
        assert http_call(running).status_code in (200, 429)
        slowest = max(slowest, time.monotonic() - started)
    if outage == signal.SIGSTOP:
        redis.send_signal(signal.SIGCONT)
    return round(slowest * 1000, 1)


def run(work: Path, shared: bool, limits: dict[str, str]) -> dict[str, Any]:
    redis_port = stack.free_port()
    with (work / f"redis-{redis_port}.log").open("wb") as log:
        redis = stack.start_redis(redis_port, log)
        stack.wait_for_redis(redis_port, redis)
        os.environ.update(CHATWIRE_API_KEYS=KEY, **limits)
        os.environ["CHATWIRE_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0" if shared else ""
        try:
            with stack.launched(work, f"limits-{redis_port}", 3) as running:
                figures: dict[str, Any] = {}
                if "CHATWIRE_RATE_LIMIT_RPM" in limits:
                    figures["requests_served_of_24"] = requests_served(running)
                else:
                    figures.update(tokens_used(running))
                    if shared:
                        figures["slowest_ms_store_stopped"] = slowest_during(redis, signal.SIGSTOP, running)
                        figures["slowest_ms_store_killed"] = slowest_during(redis, signal.SIGKILL, running)
                return figures
        finally:
            for name in ("CHATWIRE_RATE_LIMIT_RPM", "CHATWIRE_RATE_LIMIT_TPM"):
                os.environ.pop(name, None)
            stack.stop(redis)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="chatwire-bench-limits-"))
    results = {"cpu": report.cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for shared in (True, False):
        where = "shared" if shared else "per_replica"
        results[f"rpm6_{where}"] = run(work, shared, {"CHATWIRE_RATE_LIMIT_RPM": "6"})
        results[f"tpm300_{where}"] = run(work, shared, {"CHATWIRE_RATE_LIMIT_TPM": "300"})
        print(where, results[f"rpm6_{where}"], results[f"tpm300_{where}"], flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
