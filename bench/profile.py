"""Where the CPU goes per generated token, process by process and thread by thread, through the whole stack.

Starts a stack (one replica behind Envoy, as `make run`), runs a workload of streams against it with the bench's
client, and reads every thread's CPU time from /proc before and after: CPU milliseconds per generated token for
the engine worker (llama.cpp's threads and the scheduler), the gRPC server, Envoy and the client itself. On a
machine whose cores llama.cpp keeps busy, every millisecond another process uses is taken from it, so these
figures are what the stack costs beside the engine (docs/performance.md, "Where the time goes").

    PYTHONPATH=services:build/gen/python .venv/bin/python bench/profile.py --concurrency 1 --requests 8
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path

from chatwire_server.edge import stack
from run import children
from workloads import MAX_TOKENS, Workload, run_http

MODEL = "smollm2-135m-instruct"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def thread_cpu_s(pid: int) -> dict[tuple[str, int], float]:
    """(thread name, tid) -> CPU seconds (user + system) of every thread of `pid`."""
    times = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        times[(name, int(tid))] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--requests", type=int, default=8)
    args = parser.parse_args()
    workload = Workload("profile", "", args.concurrency, args.requests)
    with stack.launched(Path(tempfile.mkdtemp(prefix="chatwire-profile-")), "profile") as running:
        server = running.servers[0].pid
        processes = {
            "engine worker": children(server)[0],
            "gRPC server": server,
            "Envoy": running.envoy.pid,
            "client (httpx)": os.getpid(),
        }
        asyncio.run(run_http(running.chat_url, MODEL, Workload("warm-up", "", 1, 1, max_tokens=8)))
        before = {name: thread_cpu_s(pid) for name, pid in processes.items()}
        figures = asyncio.run(run_http(running.chat_url, MODEL, workload))
        after = {name: thread_cpu_s(pid) for name, pid in processes.items()}
    tokens = figures.tokens or args.requests * MAX_TOKENS
    itl = figures.itl_ms or (float("nan"), float("nan"))
    print(f"{tokens} tokens, concurrency {args.concurrency}: {figures.tokens_per_s:.1f} tokens/s, ITL p50 {itl[0]} ms")
    print("CPU ms per generated token (threads using at least 0.01 ms)")
    for name in processes:
        spent = {key: after[name][key] - before[name].get(key, 0.0) for key in after[name]}
        threads = sorted((s for s in spent.items() if s[1] * 1000 / tokens >= 0.01), key=lambda s: -s[1])
        detail = ", ".join(f"{thread} {1000 * s / tokens:.2f}" for (thread, _), s in threads)
        print(f"  {name:<15} {1000 * sum(spent.values()) / tokens:6.2f}   ({detail})")


if __name__ == "__main__":
    main()
