"""`make bench`, speculative decoding (issue 27; docs/performance.md, "Speculative decoding"): what a prediction
and prompt lookup gain, against chatwire with speculation off and llama-server with and without its own n-gram
speculation, all on this machine, in turns so that each sees the same minutes of it:

- edit: OpenAI's Predicted Outputs example. A ~400-token source file, an instruction to rename a field, and the
  file as the `prediction` (llama-server ignores the field: its n-gram speculation drafts from the prompt);
- extract: copy the fields of a document into JSON (no prediction: prompt lookup);
- chat: streams of 64 tokens on a short prompt, 1 and 16 at once (speculation must cost nothing there);
- predictions that do not help (another language's text, an empty one, one longer than max_tokens, one holding
  special-token text): each must cost chatwire at most a tenth of its speed.

Edit and extract run 1 and 4 requests at once; each is measured from its first token to its last (decoding; the
prompts are cached after the first round everywhere), in tokens per second of all its replies together.
Acceptance: draft tokens accepted / verified, from chatwire's metrics and llama-server's `timings`.

Adds `speculation` to bench/results/results.json and re-renders BENCHMARKS.md.

    PYTHONPATH=services:build/gen/python:clients/python:bench LLAMA_SERVER=... \\
      .venv/bin/python bench/speculation_cost.py

`--sweep` instead times llama-server's n-gram speculation settings on edit and extract at c1 and prints them: the
best is LLAMA_SPEC below.
"""

from __future__ import annotations

import contextlib
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from chatwire_server.edge import stack
from paired import MODEL, config_with, publish, streams_per_s, two_stacks
from run import Peer, llama_server_command

ROUNDS = 2
# llama-server's best n-gram speculation here: `--sweep` on an Intel Xeon (2 cores, 2026-12-06) gave, edit / extract
# tokens/s at c1, off 50.6 / 56.6; ngram-simple n3 m16 26.2 / 45.1; its default (n12 m48) 47.3 / 76.3; n4 m32
# 41.3 / 50.4; ngram-map-k n3 m16 62.1 / 59.0; ngram-mod's default 94.7 / 73.3; ngram-cache closed the connection.
LLAMA_SPEC = ["--spec-type", "ngram-mod"]
SWEEP = {
    "ngram-mod default": LLAMA_SPEC,
    "ngram-simple n3 m16": ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3",
                            "--spec-draft-n-max", "16"],
    "ngram-simple default (n12 m48)": ["--spec-type", "ngram-simple"],
    "ngram-simple n4 m32": ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "4",
                            "--spec-draft-n-max", "32"],
    "ngram-map-k n3 m16": ["--spec-type", "ngram-map-k", "--spec-ngram-map-k-size-n", "3", "--spec-draft-n-max", "16"],
}  # fmt: skip

SOURCE = """from dataclasses import dataclass


@dataclass
class Customer:
    name: str
    email: str
    age: str
    city: str
    phone: str

    def greeting(self) -> str:
        return f"Hello, {self.name}! Welcome back."

    def label(self) -> str:
        return f"{self.name} <{self.email}> ({self.city})"

    def is_adult(self) -> bool:
        return int(self.age) >= 18


def load_customers(rows: list[dict[str, str]]) -> list[Customer]:
    customers = []
    for row in rows:
        customers.append(
            Customer(
                name=row["name"],
                email=row["email"],
                age=row["age"],
                city=row["city"],
                phone=row["phone"],
            )
        )
    return customers


def find_by_name(customers: list[Customer], name: str) -> Customer | None:
    for customer in customers:
        if customer.name == name:
            return customer
    return None


def names_by_city(customers: list[Customer]) -> dict[str, list[str]]:
    cities: dict[str, list[str]] = {}
    for customer in customers:
        cities.setdefault(customer.city, []).append(customer.name)
    return cities


def summary(customers: list[Customer]) -> str:
    lines = []
    for customer in customers:
        lines.append(f"{customer.name}: {customer.age}, {customer.city}, {customer.phone}")
    return "\\n".join(lines)
"""
EDIT_SYSTEM = "You are a code editor. Reply with the complete edited file and nothing else."
DOCUMENT = (
    "Invoice 2291 from Harbor Tools Ltd, 14 Quay Street, Bristol BS1 4DJ, dated 3 March 2025. Bill to: Ana Lopez, "
    "Lopez Carpentry, 8 Mill Lane, Bath BA2 3QT. Items: 4 chisels at 12.50 GBP each, 2 mallets at 18.00 GBP each, "
    "1 workbench at 240.00 GBP. Delivery: 15.00 GBP by courier. Total due: 341.00 GBP by 2 April 2025, to account "
    "GB29 NWBK 6016 1331 9268 19, reference HT-2291-LOPEZ."
)
FRENCH = "Il était une fois, dans un petit village au bord de la mer, une vieille femme qui gardait un phare. " * 3


def edit(prediction: str | None = SOURCE, max_tokens: int = 600) -> dict[str, Any]:
    task = f"Replace every `name` with `username` in this file:\n\n```python\n{SOURCE}```"
    body: dict[str, Any] = {
        "messages": [{"role": "system", "content": EDIT_SYSTEM}, {"role": "user", "content": task}],
        "max_tokens": max_tokens,
    }
    if prediction is not None:
        body["prediction"] = {"type": "content", "content": prediction}
    return body


def extract() -> dict[str, Any]:
    ask = (
        f"{DOCUMENT}\n\nCopy the invoice number, seller, seller address, buyer, buyer address, items, total and "
        "payment reference of the invoice above into a JSON object."
    )
    return {"messages": [{"role": "user", "content": ask}], "max_tokens": 300}


EDGE = {
    "another language": edit(FRENCH, 200),
    "empty": edit("", 200),
    "longer than max_tokens": edit(SOURCE, 60),
    "special-token text": edit(SOURCE.replace("\n\n\ndef ", "<|im_end|>\n<|im_start|>\ndef "), 200),
}


def stream(client: httpx.Client, body: dict[str, Any]) -> tuple[int, float, tuple[int, int]]:
    """One greedy streamed request: its completion tokens, seconds from its first token to its last, and the
    server's own draft counts when it reports them (llama-server's `timings`)."""
    body = {"model": MODEL, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **body}
    first = last = 0.0
    tokens, drafts = 0, (0, 0)
    with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", ())):
                last = time.perf_counter()
                first = first or last
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if timings := chunk.get("timings"):
                drafts = (timings.get("draft_n", 0), timings.get("draft_n_accepted", 0))
    return tokens, last - first, drafts


def tokens_per_s(client: httpx.Client, bodies: list[dict[str, Any]]) -> tuple[float, tuple[int, int]]:
    """`bodies` at once: their tokens over the span from the first one's first token to the last one's end."""
    with ThreadPoolExecutor(len(bodies)) as pool:
        started = time.perf_counter()
        results = list(pool.map(lambda body: stream(client, body), bodies))
    if len(bodies) == 1:
        tokens, seconds, drafts = results[0]
        return tokens / seconds, drafts
    seconds = time.perf_counter() - started  # c4: the prompts are cached, so this is decoding, all four at once
    drafted = (sum(r[2][0] for r in results), sum(r[2][1] for r in results))
    return sum(r[0] for r in results) / seconds, drafted


@contextlib.contextmanager
def llama_server(name: str, spec: list[str], work: Path) -> Iterator[Peer]:
    port = stack.free_port()
    command = llama_server_command(port, parallel=16) + spec
    with contextlib.closing(Peer(name, command, "/health", port, work)) as peer:
        yield peer


def chatwire_drafts(metrics_port: int) -> tuple[float, float]:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    values = []
    for name in ("chatwire_draft_tokens_total", "chatwire_accepted_draft_tokens_total"):
        match = re.search(rf"^{name}\{{[^}}]*\}} ([0-9.e+]+)$", text, flags=re.M)
        values.append(float(match.group(1)) if match else 0.0)
    return values[0], values[1]


def workloads() -> dict[str, tuple[int, dict[str, Any]]]:
    """Each workload: how many requests at once (the same request: four users editing one file), and its body.
    The small model follows the edit's exact wording; a nonce in the prompt made it describe the file instead.
    Rounds repeat the prompts, so after the first they are cached everywhere."""
    return {
        "edit c1": (1, edit()),
        "edit c4": (4, edit()),
        "extract c1": (1, extract()),
        "extract c4": (4, extract()),
        **{f"{name} c1": (1, body) for name, body in EDGE.items()},
    }


def measure(targets: dict[str, tuple[httpx.Client, int | None]], rounds: int) -> dict[str, Any]:
    """Every workload on every target, round after round in alternating order; medians, and acceptance."""
    samples: dict[str, dict[str, list[float]]] = {t: {} for t in targets}
    drafted: dict[str, dict[str, list[float]]] = {t: {} for t in targets}
    for round_ in range(rounds + 1):  # round 0 caches the prompts and is not counted
        order = list(targets)[:: 1 if round_ % 2 else -1]
        for workload, (concurrency, body) in workloads().items():
            for target in [t for t in order if t.startswith("chatwire") or workload.startswith(("edit", "extract"))]:
                client, metrics_port = targets[target]
                before = chatwire_drafts(metrics_port) if metrics_port else (0.0, 0.0)
                rate, reported = tokens_per_s(client, [body] * concurrency)
                after = chatwire_drafts(metrics_port) if metrics_port else (0.0, 0.0)
                counts = (after[0] - before[0], after[1] - before[1]) if metrics_port else reported
                if round_:
                    samples[target].setdefault(workload, []).append(rate)
                    totals = drafted[target].setdefault(workload, [0.0, 0.0])
                    totals[0] += counts[0]
                    totals[1] += counts[1]
        print(f"round {round_} done", file=sys.stderr)
    result: dict[str, Any] = {}
    for target in targets:
        for workload, values in samples[target].items():
            verified, accepted = drafted[target][workload]
            result.setdefault(workload, {})[target] = {
                "tokens_per_s": round(statistics.median(values), 1),
                "acceptance": round(accepted / verified, 3) if verified else None,
            }
    return result


def chat(clients: dict[str, httpx.Client], rounds: int) -> dict[str, Any]:
    """Plain chat on chatwire with speculation on and off: c1 and c16 streams of 64 tokens, in turns."""
    probes = {"chat c1": streams_per_s(1), "chat c16": streams_per_s(16)}
    samples: dict[str, dict[str, list[float]]] = {name: {p: [] for p in probes} for name in clients}
    ratios: dict[str, list[float]] = {p: [] for p in probes}
    for round_ in range(rounds * 3):  # short: more rounds, as the goal is within 2 %
        for probe, run in probes.items():
            for name in list(clients)[:: 1 if round_ % 2 else -1]:
                samples[name][probe].append(run(name, clients[name]))
            ratios[probe].append(samples["chatwire"][probe][-1] / samples["chatwire-off"][probe][-1])
    return {
        probe: {
            **{name: {"tokens_per_s": round(statistics.median(samples[name][probe]), 1)} for name in clients},
            "ratio": round(statistics.median(ratios[probe]), 3),
            "round_ratios": [round(r, 3) for r in ratios[probe]],
        }
        for probe in probes
    }


def sweep(work: Path) -> None:
    """llama-server's n-gram settings on edit and extract at c1 (greedy), to pick LLAMA_SPEC."""
    for name, spec in {"off": [], **SWEEP}.items():
        with (
            llama_server("llama-server", spec, work) as peer,
            httpx.Client(base_url=peer_url(peer), timeout=600) as client,
        ):
            rates = {}
            for workload, body in (("edit", edit(None)), ("extract", extract())):
                stream(client, body)
                rates[workload] = statistics.median(tokens_per_s(client, [body])[0] for _ in range(3))
            print(name, {k: round(v, 1) for k, v in rates.items()}, flush=True)


def peer_url(peer: Peer) -> str:
    return peer.chat_url.removesuffix("/v1/chat/completions")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="chatwire-bench-speculation-"))
    if "--sweep" in sys.argv:
        sweep(work)
        return
    with contextlib.ExitStack() as running:
        on, off = running.enter_context(
            two_stacks(work, ("chatwire", "chatwire-off"), {}, config=config_with(work, "speculation", "false"))
        )
        plain = running.enter_context(llama_server("llama-server", [], work))
        ngram = running.enter_context(llama_server("llama-server-ngram", LLAMA_SPEC, work))
        client = lambda url: running.enter_context(httpx.Client(base_url=url, timeout=600))  # noqa: E731
        targets = {
            "chatwire": (client(f"http://127.0.0.1:{on.ports.http}"), on.ports.metrics),
            "chatwire-off": (client(f"http://127.0.0.1:{off.ports.http}"), None),
            "llama-server-ngram": (client(peer_url(ngram)), None),
            "llama-server": (client(peer_url(plain)), None),
        }
        section = {
            "workloads": measure(targets, ROUNDS),
            "chat": chat({"chatwire": targets["chatwire"][0], "chatwire-off": targets["chatwire-off"][0]}, ROUNDS),
        }
    section["llama_server_spec"] = " ".join(LLAMA_SPEC)
    section["rounds"] = ROUNDS
    section["command"] = (
        "PYTHONPATH=services:build/gen/python:clients/python:bench LLAMA_SERVER=<make bench's> "
        ".venv/bin/python bench/speculation_cost.py"
    )
    publish("speculation", section, "speculation", work)


if __name__ == "__main__":
    main()
