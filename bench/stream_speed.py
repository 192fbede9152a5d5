"""Single-stream speed through the whole stack: one streamed reply of N tokens via Envoy, timed.

`make bench` runs it on free ports. It reports time to first token and decode tokens/s (completion tokens
after the first, over the time from first to last content chunk), and the same reply's tokens/s as the
server itself logged it, so the edge's share is visible.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from chatwire_server import stack

MODEL = "smollm2-135m-instruct"
PROMPT = "Count from 1 to 1000, separated by commas."


def one_stream(base_url: str, max_tokens: int) -> dict[str, float]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = last = 0.0
    usage: dict[str, int] = {}
    with httpx.stream("POST", f"{base_url}/chat/completions", json=body, timeout=300) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    tokens = usage["completion_tokens"]
    return {"tokens": tokens, "ttft_s": first - started, "tokens_per_s": (tokens - 1) / (last - first)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    ports = stack.Ports(http=stack.free_port(), grpc=stack.free_port(), admin=stack.free_port())
    work = Path(tempfile.mkdtemp(prefix="chatwire-bench-"))
    config = work / "envoy.yaml"
    config.write_text(stack.render_envoy_config(ports))
    with (work / "server.log").open("wb") as server_log, (work / "envoy.log").open("wb") as envoy_log:
        server = stack.start_server(ports.grpc, server_log)
        envoy = stack.start_envoy(config, ports.admin, envoy_log)
        try:
            stack.wait_for_server(ports.grpc, server)
            stack.wait_for_envoy(ports.admin, envoy)
            base_url = f"http://127.0.0.1:{ports.http}/v1"
            one_stream(base_url, 8)  # warm-up
            runs = [one_stream(base_url, args.max_tokens) for _ in range(args.runs)]
        finally:
            stack.stop(envoy)
            stack.stop(server)
    logged = [
        r["tokens_per_s"]
        for r in map(json.loads, (work / "server.log").read_text().splitlines()[1:])
        if r.get("msg") == "generation finished" and r["completion_tokens"] == args.max_tokens
    ]
    for run in runs:
        print(f"{run['tokens']:.0f} tokens  ttft {run['ttft_s'] * 1000:.0f} ms  {run['tokens_per_s']:.1f} tok/s")
    print(
        f"median over {args.runs} streams of {args.max_tokens} tokens: "
        f"{statistics.median(r['tokens_per_s'] for r in runs):.1f} tok/s through Envoy, "
        f"TTFT {statistics.median(r['ttft_s'] for r in runs) * 1000:.0f} ms; "
        f"engine-side (server log) {statistics.median(logged) if logged else float('nan'):.1f} tok/s"
    )
    if any(r["tokens"] != args.max_tokens for r in runs):
        sys.exit("a stream ended early: the numbers above are not for the requested length")


if __name__ == "__main__":
    main()
