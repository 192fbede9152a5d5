"""Two stacks of one replica measured in turns, so that both see the same minutes of the machine: the baseline
and one started with extra settings (TLS, tracing, a model setting). Shared by bench/tls_cost.py,
bench/tracing_cost.py and bench/batch_invariance_cost.py."""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

import report
from chatwire_server.edge import stack

MODEL = "smollm2-135m-instruct"
HI = [{"role": "user", "content": "Hi"}]
NO_END = {"0": -100, "2": -100, "4": -100}
STREAM_TOKENS = 64
# A probe: one timed request (seconds) on a stack's client, by the stack's name.
Probe = Callable[[str, httpx.Client], float]


@contextlib.contextmanager
def two_stacks(
    work: Path, names: tuple[str, str], env: dict[str, str], config: Path = stack.DEFAULT_CONFIG
) -> Iterator[tuple[Any, Any]]:
    """The baseline stack `names[0]`, and `names[1]` whose servers and Envoy start with `env` as well, serving the
    models of `config`."""
    with contextlib.ExitStack() as running:
        baseline = running.enter_context(stack.launched(work, names[0], 1))
        os.environ.update(env)  # the second stack (its servers and Envoy) reads them
        try:
            other = running.enter_context(stack.launched(work, names[1], 1, config=config))
        finally:
            for name in env:
                os.environ.pop(name)
        yield baseline, other


def config_with(work: Path, name: str, value: str) -> Path:
    """The default model config with the commented-out setting `name` (config/models.toml shows each one's
    default as `# name = ...`) set to `value`, written into `work`."""
    text, found = re.subn(rf"^# {name} = .*$", f"{name} = {value}", stack.DEFAULT_CONFIG.read_text(), flags=re.M)
    assert found == 1, f"config/models.toml lost its {name} line"
    config = work / "models.toml"
    config.write_text(text)
    return config


def carries_token(line: str) -> bool:
    """Whether an SSE line is a chunk with generated text (not the role chunk that opens a stream)."""
    return '"content":"' in line and '"content":""' not in line


def first_token_s(_: str, client: httpx.Client) -> float:
    body = {"model": MODEL, "messages": HI, "max_tokens": 4, "stream": True, "logit_bias": NO_END}
    started = time.perf_counter()
    first = None
    with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        for line in reply.iter_lines():  # to the end, so the connection is reused
            if first is None and carries_token(line):
                first = time.perf_counter() - started
    assert first is not None, "no token"
    return first


def one_token_s(_: str, client: httpx.Client) -> float:
    started = time.perf_counter()
    client.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 1}).raise_for_status()
    return time.perf_counter() - started


def streams_per_s(streams: int) -> Probe:
    """Tokens per second of `streams` streams of STREAM_TOKENS tokens each, all at once."""
    body = {"model": MODEL, "messages": HI, "max_tokens": STREAM_TOKENS, "stream": True, "logit_bias": NO_END}

    def measure(_: str, client: httpx.Client) -> float:
        def stream(_: int) -> int:
            with client.stream("POST", "/v1/chat/completions", json=body) as reply:
                return sum(1 for line in reply.iter_lines() if carries_token(line))

        started = time.perf_counter()
        with ThreadPoolExecutor(streams) as pool:
            tokens = sum(pool.map(stream, range(streams)))
        return tokens / (time.perf_counter() - started)

    return measure


c16_tokens_per_s = streams_per_s(16)


def warm(clients: dict[str, httpx.Client]) -> None:
    """Before measuring: connections open, the probes' prompt cached."""
    for name, client in clients.items():
        for _ in range(5):
            first_token_s(name, client)


def in_turns(clients: dict[str, httpx.Client], probes: dict[str, Probe], rounds: int) -> dict[str, dict[str, list]]:
    """Each probe's samples per stack (after `warm`): every round runs each probe on both stacks, in alternating
    order."""
    samples: dict[str, dict[str, list[float]]] = {name: {probe: [] for probe in probes} for name in clients}
    for round_ in range(rounds):
        for name in list(clients)[:: 1 if round_ % 2 else -1]:
            for probe, measure in probes.items():
                samples[name][probe].append(measure(name, clients[name]))
    return samples


def p50_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 2)


def publish(name: str, section: dict[str, Any], what: str, work: Path) -> None:
    """Print the section (with the CPU and date), add it to bench/results/results.json and re-render BENCHMARKS.md."""
    section = {"cpu": report.cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **section}
    print(json.dumps(section, indent=2))
    report.save_section(name, section)
    print(f"wrote the {what} figures to {report.RESULTS} (logs in {work})")
