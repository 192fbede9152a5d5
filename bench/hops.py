"""Time to first token of a 1-token reply, layer by layer: what each hop of the stack adds.

The bench's overhead request (a cached prompt, one token) is sent through four paths, one request per path in
turn, so that every path sees the same minutes of this machine:
  engine   chatwire's engine in this process (`LlamaCppEngine.generate`: no process boundary)
  worker   the engine behind the worker hop (`WorkerEngine`: the request and its events pickled over a socket
           pair to and from an engine worker process, as the gRPC server runs it)
  grpc     a stack's gRPC server, called directly (grpc.aio client: the client's own cost counts here)
  http     the same stack through Envoy, a bare HTTP/1.1 socket as the client (`make bench`'s overhead workload)
Each path has its own llama.cpp (engine, worker, the stack's worker); one request at a time, they never compete.

    PYTHONPATH=services:build/gen/python .venv/bin/python bench/hops.py --requests 40
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from ceiling import EngineRunner
from chatwire.v1 import chat_service_pb2_grpc
from chatwire_server.edge import stack
from chatwire_server.engines.llama_cpp import LlamaCppEngine
from chatwire_server.engines.worker import WorkerEngine
from chatwire_server.server import DEFAULT_CONFIG
from run import MODEL, first_token_grpc
from workloads import OVERHEAD, Stream, first_token_http, request_body

PAUSE_S = 0.1


async def measure(requests: int, running: stack.Launched) -> dict[str, list[float]]:
    settings = next(m for m in tomllib.loads(DEFAULT_CONFIG.read_text())["models"] if m["id"] == MODEL)["settings"]
    in_process = EngineRunner(LlamaCppEngine.from_settings(settings))
    behind_worker = EngineRunner(WorkerEngine(MODEL, "llama_cpp", settings))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.ports.grpc}") as channel:
        stub = chat_service_pb2_grpc.ChatServiceStub(channel)
        paths: dict[str, Callable[[int], Awaitable[Stream]]] = {
            "engine": lambda i: in_process.one(OVERHEAD, i),
            "worker": lambda i: behind_worker.one(OVERHEAD, i),
            "grpc": lambda i: first_token_grpc(stub, request_body(OVERHEAD, i, MODEL)),
            "http": lambda i: first_token_http("127.0.0.1", running.ports.http, request_body(OVERHEAD, i, MODEL)),
        }
        ttft_ms: dict[str, list[float]] = {name: [] for name in paths}
        for i in range(-3, requests):  # three rounds to warm every path up, not counted
            for name, one in paths.items():
                # llama.cpp's OpenMP threads spin for a while after a decode: let the last path's go to sleep
                # first, so that they do not take a core from this one.
                await asyncio.sleep(PAUSE_S)
                stream = await one(i)
                if stream.error or stream.first_token is None:
                    raise RuntimeError(f"{name}: {stream.error or 'no token'}")
                if i >= 0:
                    ttft_ms[name].append(1000 * (stream.first_token - stream.started))
    await in_process.engine.close()
    await behind_worker.engine.close()
    return ttft_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40, help="per path")
    args = parser.parse_args()
    with stack.launched(Path(tempfile.mkdtemp(prefix="chatwire-hops-")), "hops") as running:
        ttft_ms = asyncio.run(measure(args.requests, running))
    p50 = {name: statistics.median(values) for name, values in ttft_ms.items()}
    print(f"time to first token of a 1-token reply, {args.requests} requests per path, taken in turn (ms)")
    print(f"{'path':<8} {'p50':>7} {'p90':>7}   added to the path above (p50)")
    previous = None
    for name, values in ttft_ms.items():
        p90 = statistics.quantiles(values, n=10)[-1]
        added = f"{p50[name] - p50[previous]:+.2f}" if previous else ""
        print(f"{name:<8} {p50[name]:7.2f} {p90:7.2f}   {added}")
        previous = "worker" if name == "grpc" else name  # http is compared with the worker too: grpc's client
    print(f"edge overhead (http - engine, as `make bench` judges it): {p50['http'] - p50['engine']:.2f} ms")


if __name__ == "__main__":
    main()
