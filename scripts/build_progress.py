"""Shows a long compile's progress from its verbose output (stdin): `pip wheel -v` of llama-cpp-python prints
ninja's `[done/total] command` lines. Prints a line whenever another tenth is done (what it is compiling, the
time so far and a rough time left), keeps the whole output in a log file, and prints that log's tail if the
build fails (the exit status is the pipeline's: run it under `set -o pipefail`).

Usage: <build command> 2>&1 | python scripts/build_progress.py LOG_FILE LABEL
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

STEP = re.compile(r"^\s*\[(\d+)/(\d+)\]\s+(.*)$")
SOURCE = re.compile(r"-c\s+(\S+\.(?:c|cc|cpp))\b")
TAIL_LINES = 40


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def main() -> None:
    log_path, label = Path(sys.argv[1]), sys.argv[2]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    shown_tenth = -1
    tail: list[str] = []
    with log_path.open("w") as log:
        for line in sys.stdin:
            log.write(line)
            tail = [*tail[-(TAIL_LINES - 1) :], line.rstrip()]
            step = STEP.match(line)
            if not step:
                continue
            done, total = int(step.group(1)), int(step.group(2))
            tenth = 10 * done // total
            if tenth <= shown_tenth:
                continue
            shown_tenth = tenth
            elapsed = time.monotonic() - started
            left = f", about {_minutes(elapsed * (total - done) / done)} left" if done >= total // 10 else ""
            source = SOURCE.search(step.group(3))
            path = source.group(1).partition("/vendor/llama.cpp/")[2] if source else ""
            what = f"; compiling {path}" if path else ""
            print(f"[{label}] {100 * done // total}% ({done}/{total}), {_minutes(elapsed)}{left}{what}", flush=True)
    took = _minutes(time.monotonic() - started)
    print(f"[{label}] finished reading the build's output after {took}; log: {log_path}")
    if shown_tenth < 10:
        print("\n".join(tail), file=sys.stderr)


if __name__ == "__main__":
    main()
