"""`make bench`, part three: the first requests after start-up. A fresh stack, timed from start to ready,
then waves of 16 concurrent streams one after another (the c16 workload, no request before them). Waves 1-3
each ask questions of their own (their prompts share the system prompt, as those of one wave do): if the
server did first-time work in its first clients' time, wave 1 would wait longer than waves 2 and 3. Wave 4
asks wave 3's questions again: what the prefix cache saves, for comparison. Adds `first_waves` to
bench/results/results.json and re-renders BENCHMARKS.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
import time
from pathlib import Path

import report
from chatwire_server.edge import stack
from workloads import WORKLOADS, run_http

MODEL = "smollm2-135m-instruct"
# The question set of each wave: new ones, then the last ones again.
WAVES = (1, 2, 3, 3)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="chatwire-bench-first-waves-"))
    c16 = next(w for w in WORKLOADS if w.name == "c16")
    waves = []
    started = time.monotonic()
    with stack.launched(work, "first-waves") as running:
        ready_s = time.monotonic() - started
        for wave, questions in enumerate(WAVES, 1):
            figures = asyncio.run(run_http(running.chat_url, MODEL, dataclasses.replace(c16, variant=questions)))
            p50, p99 = figures.ttft_ms or (None, None)
            waves.append(
                {
                    "wave": wave,
                    "questions": "new" if questions == wave else f"wave {questions}'s again",
                    "completed": figures.completed,
                    "errors": len(figures.errors),
                    "ttft_p50_ms": p50,
                    "ttft_p99_ms": p99,
                }
            )
            print(f"first waves: {waves[-1]}", flush=True)
    report.save_section(
        "first_waves",
        {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "start_to_ready_s": round(ready_s, 2),
            "workload": c16.description,
            "waves": waves,
        },
    )
    print(f"wrote the first-wave figures to {report.RESULTS} (logs in {work})")


if __name__ == "__main__":
    main()
