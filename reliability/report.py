"""RELIABILITY.md from the latest fuzz and soak results (reliability/results/fuzz.json, soak.json), as
bench/report.py renders BENCHMARKS.md. `make fuzz` and `make soak` run it after their tests; by hand:
`python reliability/report.py` (renders whichever results exist)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "reliability" / "results"

FAMILIES = {
    "fixed": "one request per known hostile reproduction (schemas, n, logit_bias, 1 MiB fields, huge arrays, "
    "headers, content types, paths, gRPC messages)",
    "fields": "valid requests mutated field by field: every CreateChatCompletionRequest property, wrong types, "
    "out-of-range numbers, huge/unicode/NUL strings, nulls, deep nesting, huge arrays",
    "schemas": "random and hostile JSON schemas in response_format and tool parameters",
    "raw": "raw HTTP/1.1: methods, paths, query strings, content types, headers (grpc-timeout, huge), framing, "
    "invalid and truncated bodies",
    "reuse": "raw HTTP/1.1 framed right on a connection kept open, each followed on it by GET /v1/models: any "
    "reply that breaks the framing of the next (a body on HEAD, a wrong length) fails",
    "grpc-bytes": "random and broken bytes as the request message of every RPC",
    "grpc-messages": "well-formed protobuf messages with hostile field values",
    "faults": "the ordinary request sent right after each injected fault",
}


def _cell(text: Any, limit: int = 160) -> str:
    value = str(text).replace("|", "\\|").replace("\n", " ").replace("\r", " ")
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _statuses(counts: dict[str, int], limit: int = 6) -> str:
    items = list(counts.items())
    shown = ", ".join(f"{status} \u00d7{n}" for status, n in items[:limit])
    return shown + (f", … ({len(items) - limit} more)" if len(items) > limit else "")


def _ms(summary: dict[str, float], key: str) -> str:
    return f"{summary[key]:.0f}" if key in summary else "-"


def _header(results: dict[str, Any]) -> list[str]:
    machine = results["machine"]
    return [
        f"Reproduce: `{results['command']}`",
        "",
        f"One run on {machine['date']}: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}.",
        "",
    ]


def fuzz_section(results: dict[str, Any]) -> list[str]:
    settings, run = results["settings"], results["run"]
    families = results["families"]
    cases = sum(f["cases"] for f in families.values())
    broken = sum(f["violations"] for f in families.values())
    http = sum(f["cases"] for name, f in families.items() if not name.startswith("grpc"))
    grpc = cases - http
    # Server faults a client saw: 5xx (bar the allowed 503), gRPC codes that are not the caller's fault, server
    # errors ending a stream, no reply at all or a reply past the time bound.
    faults = ("HTTP 5", "status ", "stream ended with a server error", "no response", "connection closed", "took ")
    five = sum(1 for v in results["violations"] if any(p.startswith(faults) for p in v["problems"]))
    canary = run["canary"]
    lines = [
        "## Fuzzing",
        "",
        *_header(results),
        f"{cases} cases ({http} over HTTP through Envoy, {grpc} over gRPC straight to the server) in "
        f"{results['duration_s']:.0f} s: {settings['http_cases']} random HTTP and {settings['grpc_cases']} random "
        f"gRPC cases drawn by hypothesis {settings['hypothesis']} "
        f"({'fresh randomness' if settings['random'] else 'derandomized: the same sample every run'}), plus the "
        "fixed cases and the injected faults. Every case must get no 5xx (bar a 503 "
        f"`{'`/`'.join(settings['allowed_503_codes'])}`), an OpenAI-shaped error body for every 4xx (gRPC: a "
        "client-error code and an OpenAI-shaped `x-chatwire-error` trailer), a valid reply or stream ending in "
        "`data: [DONE]` for every 200 and a 200 only from a URL the edge serves, docs/design.md's structured-output "
        "guarantees (a JSON reply that ends with `stop` parses and matches its schema; `required` or a named tool "
        f"calls a tool whose arguments match its parameters), all within {settings['time_bound_s']:.0f} s "
        "plus 5 ms per byte of request (time for a long prompt's prefill). Valid requests the strategies build ask "
        "for at most 8 tokens and n ≤ 4; mutated ones may ask for anything, and the fuzz stack's engine bounds "
        "what one request may generate (1,024 tokens of context, 1,024 completion tokens in all).",
        "",
        "| check | result |",
        "|---|---|",
        f"| cases that broke a rule | **{broken}** of {cases} |",
        f"| cases where the server failed (5xx, INTERNAL/UNKNOWN/…, no reply, over the time bound) | {five} |",
        f"| engine worker restarts | {run['engine_restarts']:.0f} (worker pids {run['workers_before']} → "
        f"{run['workers_after']}) |",
        f"| canary (1 token, every 2 s) | {canary['served']} served, **{canary['failed']} failed**; latency p50 "
        f"{_ms(canary['latency'], 'p50_ms')} ms, p99 {_ms(canary['latency'], 'p99_ms')} ms, max "
        f"{_ms(canary['latency'], 'max_ms')} ms |",
        f"| `/health` at the end | {run['health_at_end']} |",
        f"| running sequences / queued requests at the end | {run['running_sequences_at_end']:.0f} / "
        f"{run['queued_requests_at_end']:.0f} |",
        "",
    ]
    if run["problems"]:
        lines += ["Run-level problems:", "", *[f"- {_cell(p, 400)}" for p in run["problems"]], ""]
    lines += [
        "### Cases by family",
        "",
        "| family | what | cases | broke a rule | statuses | p50 ms | p99 ms | max ms |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for name, family in families.items():
        d = family["durations"]
        lines.append(
            f"| {name} | {FAMILIES.get(name, '')} | {family['cases']} | {family['violations']} | "
            f"{_cell(_statuses(family['statuses']), 200)} | {_ms(d, 'p50_ms')} | {_ms(d, 'p99_ms')} | "
            f"{_ms(d, 'max_ms')} |"
        )
    lines += ["", "### Statuses, all families", "", "| status | cases |", "|---|---:|"]
    lines += [f"| {_cell(status)} | {n} |" for status, n in results["statuses"].items()]
    lines += ["", "### Slowest cases", "", "| ms | family | case | status |", "|---:|---|---|---|"]
    lines += [
        f"| {s['duration_ms']:.0f} | {s['family']} | {_cell(s['case'])} | {_cell(s['status'])} |"
        for s in results["slowest"]
    ]
    lines += [
        "",
        "### Faults injected and what clients saw",
        "",
        "Each fault is followed at once by an ordinary request (2 tokens); the canary runs throughout.",
        "",
        "| fault | times | what its client saw | the next request |",
        "|---|---:|---|---|",
    ]
    for name, seen in results["faults"].items():
        times = sum(seen["client_saw"].values())
        lines.append(
            f"| {name} | {times} | {_cell(_statuses(seen['client_saw']))} | {_cell(_statuses(seen['next_request']))} |"
        )
    violations = results["violations"]
    lines += ["", "### Cases that broke a rule", ""]
    if not violations:
        lines += ["None.", ""]
    else:
        lines += ["| family | case | status | what was wrong |", "|---|---|---|---|"]
        for v in violations[:80]:
            lines.append(
                f"| {v['family']} | {_cell(v['case'], 120)} | {_cell(v['status'])} | "
                f"{_cell('; '.join(v['problems']), 300)} |"
            )
        if len(violations) > 80:
            lines.append(f"\n{len(violations) - 80} more in reliability/results/fuzz.json.")
        lines.append("")
    return lines


def soak_section(results: dict[str, Any]) -> list[str]:
    settings, run, counts = results["settings"], results["run"], results["counts"]
    hung = sum(n for key, n in counts.items() if key.startswith("hung up"))
    canary = run["canary"]
    lines = [
        "## Soak",
        "",
        *_header(results),
        f"{settings['streams']} concurrent streams for {settings['seconds']:.0f} s (the run took "
        f"{results['duration_s']:.0f} s with the streams in flight at the end), loopback only; about "
        f"{100 * settings['hang_up_share']:.0f}% of the streams hung up by their client before the end (before any "
        "event: a socket closed 0-2 s after sending; or after 1, 2 or 5 events). Each stream asks for 8 to 48 "
        "tokens at temperature 0.8.",
        "",
        "| check | result |",
        "|---|---|",
        f"| streams started / completed | {counts.get('started', 0)} / {counts.get('completed', 0)} |",
        f"| hung up by the client (injected) | {hung} ({_cell(_statuses({k: v for k, v in counts.items() if k.startswith('hung')}))}) |",  # noqa: E501
        f"| errors | **{counts.get('errors', 0)}** |",
        f"| tokens streamed | {results['tokens']} ({results['tokens_per_s']:.1f}/s) |",
        f"| time to first token p50 / p99 | {_ms(results['ttft'], 'p50_ms')} / {_ms(results['ttft'], 'p99_ms')} ms |",
        f"| engine worker restarts | {run['engine_restarts']:.0f} |",
        f"| canary (1 token, every 2 s) | {canary['served']} served, **{canary['failed']} failed** (p50 "
        f"{_ms(canary['latency'], 'p50_ms')} ms, max {_ms(canary['latency'], 'max_ms')} ms) |",
        f"| running sequences / queued requests at the end | {run['running_sequences_at_end']:.0f} / "
        f"{run['queued_requests_at_end']:.0f} |",
        f"| `/health` at the end | {run['health_at_end']} |",
        "",
        "### Memory (RSS)",
        "",
        f"Slope: least squares over the samples after warm-up (the first {100 * settings['warmup_share']:.0f}% of "
        f"the run). Flat: the slope, projected over that window, grows less than max({settings['flat_mb']:.0f} MB, "
        f"{100 * settings['flat_share']:.0f}% of the process's RSS).",
        "",
        "| process | pid | start MB | end MB | peak MB | slope MB/min | growth over window | flat |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, m in results["memory"].items():
        lines.append(
            f"| {name} | {results['pids'][name]} | {m['start_mb']} | {m['end_mb']} | {m['peak_mb']} | "
            f"{m['slope_mb_per_min']:+.2f} | {m['growth_over_window_mb']:+.1f} MB in {m['window_s']:.0f} s "
            f"(allowed {m['allowed_growth_mb']:.0f}) | {'yes' if m['flat'] else '**no**'} |"
        )
    lines.append("")
    problems = list(run["problems"]) + [f"error: {e}" for e in results["errors"][:20]]
    if problems:
        lines += ["### Problems", "", *[f"- {_cell(p, 400)}" for p in problems], ""]
    return lines


def markdown(fuzz: dict[str, Any] | None, soak: dict[str, Any] | None) -> str:
    lines = [
        "# Reliability",
        "",
        "Generated by `make fuzz` and `make soak` (reliability/report.py, from reliability/results/*.json); do not",
        "edit by hand. The fuzzer is tests/test_fuzz.py with its case families in tests/fuzzing.py; the soak is",
        "tests/test_soak.py. Both run against the real stack (Envoy, the gRPC server, the engine worker with the",
        "real model), started for them alone. `make test` runs a bounded, derandomized sample of the fuzzer.",
        "",
    ]
    if fuzz:
        lines += fuzz_section(fuzz)
    else:
        lines += ["## Fuzzing", "", "Not run yet: `make fuzz`.", ""]
    if soak:
        lines += soak_section(soak)
    else:
        lines += ["## Soak", "", "Not run yet: `make soak`.", ""]
    lines += SERVER_FAULTS
    return "\n".join(lines)


# Faults injected into the service's own processes: each is a test that `make test` runs on every change.
SERVER_FAULTS = [
    "## Faults in the service's processes (tested by `make test`)",
    "",
    "| fault | what clients see | test |",
    "|---|---|---|",
    "| engine worker SIGKILLed mid-stream | the stream ends with an `engine_failed` error event and `data: [DONE]`; "
    "503 `engine_restarting` with `Retry-After` until the worker is back (seconds) | "
    "tests/test_stream_errors.py::test_a_stream_cut_by_a_killed_engine_ends_with_an_error_event |",
    "| engine worker frozen (SIGSTOP) mid-stream | the watchdog kills it after `CHATWIRE_ENGINE_STALL_TIMEOUT_S`; "
    "then as above | tests/test_request_limits.py::test_a_wedged_engine_is_restarted_and_its_requests_fail_cleanly |",
    "| gRPC server SIGKILLed under `make run` | 503 `service_unavailable` from the edge until the launcher has "
    "restarted it | tests/test_edge_hardening.py::test_make_run_restarts_what_dies_and_stops_cleanly |",
    "| Envoy SIGKILLed under `make run` | connection refused until the launcher has restarted it (about a second) | "
    "tests/test_edge_hardening.py::test_make_run_restarts_what_dies_and_stops_cleanly |",
    "| SIGTERM to the server | in-flight requests finish, new ones are refused, then it exits | "
    "tests/test_lifecycle.py::test_sigterm_lets_a_running_stream_finish_then_exits |",
    "",
]


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def main(argv: list[str]) -> None:
    results = Path(argv[1]) if len(argv) > 1 else RESULTS
    out = ROOT / "RELIABILITY.md"
    out.write_text(markdown(_load(results / "fuzz.json"), _load(results / "soak.json")))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv)
