"""`make bench`, part three: the first requests after start-up. A fresh stack, timed from start to SERVING,
then waves of 16 concurrent streams one after another (the c16 workload, no request before them). Waves 1-3
each ask questions of their own (their prompts share the system prompt, as those of one wave do): if the
server did first-time work in its first clients' time, wave 1 would wait longer than waves 2 and 3. Wave 4
asks wave 3's questions again: what the prefix cache saves, for comparison. Adds `first_waves` to
bench/results/results.json and re-renders BENCHMARKS.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chatwire_server.edge import stack
from workloads import WORKLOADS, run_http

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results" / "results.json"
MODEL = "smollm2-135m-instruct"
# The question set of each wave: new ones, then the last ones again.
WAVES = (1, 2, 3, 3)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="chatwire-bench-first-waves-"))
    c16 = next(w for w in WORKLOADS if w.name == "c16")
    ports = stack.Ports(
        http=stack.free_port(), grpc=stack.free_port(), admin=stack.free_port(), metrics=stack.free_port()
    )
    config = work / "envoy.yaml"
    config.write_text(stack.render_envoy_config(ports))
    waves = []
    with (work / "server.log").open("wb") as server_log, (work / "envoy.log").open("wb") as envoy_log:
        started = time.monotonic()
        server = stack.start_server(ports.grpc, server_log, metrics_port=ports.metrics)
        envoy = stack.start_envoy(config, ports.admin, envoy_log)
        try:
            stack.wait_for_server(ports.grpc, server)
            serving_s = time.monotonic() - started
            stack.wait_for_envoy(ports.admin, envoy)
            url = f"http://127.0.0.1:{ports.http}/v1/chat/completions"
            for wave, questions in enumerate(WAVES, 1):
                figures = asyncio.run(run_http(url, MODEL, dataclasses.replace(c16, variant=questions))).to_json()
                p50, p99 = figures["ttft_ms"] or (None, None)
                waves.append(
                    {
                        "wave": wave,
                        "questions": "new" if questions == wave else f"wave {questions}'s again",
                        "completed": figures["completed"],
                        "errors": len(figures["errors"]),
                        "ttft_p50_ms": p50,
                        "ttft_p99_ms": p99,
                    }
                )
                print(f"first waves: {waves[-1]}", flush=True)
        finally:
            stack.stop(envoy)
            stack.stop(server)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["first_waves"] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "start_to_serving_s": round(serving_s, 2),
        "workload": c16.description,
        "waves": waves,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    if "targets" in results:  # a full `make bench` run: re-render BENCHMARKS.md with this section
        subprocess.run([sys.executable, str(BENCH / "report.py"), str(RESULTS)], check=True)
    print(f"wrote the first-wave figures to {RESULTS} (logs in {work})")


if __name__ == "__main__":
    main()
