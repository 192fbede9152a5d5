"""Fuzzing the real stack (Envoy, gRPC server, engine worker with the real model) over HTTP and gRPC.

tests/fuzzing.py has the case families and the checks. Every case must get no 5xx (bar the documented 503
`engine_restarting`), OpenAI-shaped 4xx bodies (gRPC: a client-error code and the `x-chatwire-error` trailer),
valid 200 replies and streams, within TIME_BOUND_S; the run as a whole must leave the engine worker as it found
it, serve a canary request every 2 s throughout, and end healthy with nothing running.

`make test` runs a bounded, reproducible sample (CHATWIRE_FUZZ_HTTP_CASES=150, CHATWIRE_FUZZ_GRPC_CASES=50, plus
the fixed cases); `make fuzz` runs >= 10,000 HTTP and >= 1,000 gRPC cases with fresh randomness and writes
reliability/results/fuzz.json, which reliability/report.py renders into RELIABILITY.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
from hypothesis import given

import fuzzing as fz
from chatwire_server.edge import stack
from conftest import Stack, run_stack

pytestmark = pytest.mark.fuzz

# Shares of the random cases per family.
FIELDS, SCHEMAS, RAW, REUSE = (round(fz.HTTP_CASES * share) for share in (0.45, 0.25, 0.15, 0.15))
GRPC_BYTES, GRPC_MESSAGES = (round(fz.GRPC_CASES * share) for share in (0.5, 0.5))
FAULT_ROUNDS = max(1, fz.HTTP_CASES // 200)


def _timeout(cases: int) -> pytest.MarkDecorator:
    """A hang guard for a family: generous per case, since each case has its own time bound."""
    return pytest.mark.timeout(max(300, 60 + 5 * cases))


@dataclass
class FuzzRun:
    stack: Stack
    watch: fz.Watch
    results: fz.Results
    http: httpx.Client
    channel: grpc.Channel

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.stack.ports.http}"

    def http_case(self, case: fz.HttpCase) -> fz.Outcome:
        if case.raw is not None:
            outcome = fz.send_raw(self.stack.ports.http, case)
            request = case.raw
        else:
            outcome = fz.send_http(self.http, self.base, case)
            request = fz.encode(case.body)
        self.results.record(case.family, case.description, outcome, request)
        return outcome

    def grpc_case(self, case: fz.GrpcCase) -> fz.Outcome:
        outcome = fz.send_grpc(self.channel, case)
        self.results.record(case.family, case.description, outcome, case.payload[:300].hex().encode())
        return outcome

    def assert_clean(self, family: str) -> None:
        found = self.results.of_family(family)
        listed = "\n".join(f"- [{v['status']}] {v['case']}\n    " + "\n    ".join(v["problems"]) for v in found[:40])
        assert not found, f"{len(found)} of {self.results.cases[family]} `{family}` cases broke the rules:\n{listed}"


@pytest.fixture(scope="module")
def fuzz(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzRun]:
    """A stack of its own (so that an engine restart is this module's doing), watched for the whole module. Its
    engine bounds what one request may generate (1,024 tokens of context, 1,024 completion tokens in all): a
    mutated `max_tokens` or `n` asks for long replies that are legitimate work, not faults, and would take minutes
    on 2 cores; every input path is the same as with the default settings."""
    config = tmp_path_factory.mktemp("fuzz") / "models.toml"
    config.write_text(
        stack.DEFAULT_CONFIG.read_text()
        .replace("# max_context = 8192", "max_context = 1024")
        .replace("max_completion_budget = 65536", "max_completion_budget = 1024")
    )
    assert "\nmax_context = 1024" in config.read_text() and "max_completion_budget = 1024" in config.read_text()
    with (
        run_stack(request, config) as running,
        httpx.Client(timeout=fz.TIME_BOUND_S) as http,
        grpc.insecure_channel(running.grpc_target) as channel,
    ):
        results = fz.Results()
        watch = fz.Watch(running)
        with watch:
            yield FuzzRun(running, watch, results, http, channel)
        fz.write_results(
            "fuzz",
            {
                **results.as_dict(),
                "run": watch.finish(),
                "settings": {
                    "http_cases": fz.HTTP_CASES,
                    "grpc_cases": fz.GRPC_CASES,
                    "random": fz.RANDOM,
                    "time_bound_s": fz.TIME_BOUND_S,
                    "allowed_503_codes": sorted(fz.ALLOWED_503_CODES),
                    "hypothesis": _hypothesis_version(),
                },
            },
        )


def _hypothesis_version() -> str:
    import hypothesis

    return str(hypothesis.__version__)


# --- fixed cases: one request each --------------------------------------------------------------------------

FIXED_HTTP = fz.fixed_http_cases() + fz.fixed_raw_cases()
FIXED_GRPC = fz.fixed_grpc_cases()


def _report(outcome: fz.Outcome) -> str:
    return f"[{outcome.status} in {outcome.duration:.1f} s] " + "; ".join(outcome.violations)


@pytest.mark.parametrize("case", FIXED_HTTP, ids=[c.description for c in FIXED_HTTP])
def test_fixed_http(fuzz: FuzzRun, case: fz.HttpCase) -> None:
    outcome = fuzz.http_case(case)
    assert not outcome.violations, _report(outcome)


@pytest.mark.parametrize("case", FIXED_GRPC, ids=[c.description for c in FIXED_GRPC])
def test_fixed_grpc(fuzz: FuzzRun, case: fz.GrpcCase) -> None:
    outcome = fuzz.grpc_case(case)
    assert not outcome.violations, _report(outcome)


# --- random families ----------------------------------------------------------------------------------------


def _run(strategy: Any, examples: int, send: Any) -> None:
    @fz.hypothesis_settings(examples)
    @given(case=strategy)
    def one(case: Any) -> None:
        send(case)

    one()


@_timeout(FIELDS)
def test_fields(fuzz: FuzzRun) -> None:
    """Valid requests mutated field by field (every property of CreateChatCompletionRequest)."""
    _run(fz.field_cases(), FIELDS, fuzz.http_case)
    fuzz.assert_clean("fields")


@_timeout(SCHEMAS)
def test_schemas(fuzz: FuzzRun) -> None:
    """Random and hostile JSON schemas in response_format and tool parameters."""
    _run(fz.schema_cases(), SCHEMAS, fuzz.http_case)
    fuzz.assert_clean("schemas")


@_timeout(RAW)
def test_raw_http(fuzz: FuzzRun) -> None:
    """Bytes on a socket: methods, paths, content types, headers, framing, bodies."""
    _run(fz.raw_cases(), RAW, fuzz.http_case)
    fuzz.assert_clean("raw")


@_timeout(REUSE)
def test_reused_connections(fuzz: FuzzRun) -> None:
    """`raw` requests on a connection kept open, each followed on it by another request: no reply may break the
    framing of the next (a body on HEAD, a length that lies)."""
    _run(fz.raw_cases(reuse=True), REUSE, fuzz.http_case)
    fuzz.assert_clean("reuse")


@_timeout(GRPC_BYTES)
def test_grpc_bytes(fuzz: FuzzRun) -> None:
    """Random and broken bytes as the request message of every RPC."""
    _run(fz.grpc_byte_cases(), GRPC_BYTES, fuzz.grpc_case)
    fuzz.assert_clean("grpc-bytes")


@_timeout(GRPC_MESSAGES)
def test_grpc_messages(fuzz: FuzzRun) -> None:
    """Well-formed protobuf messages with hostile field values."""
    _run(fz.grpc_message_cases(), GRPC_MESSAGES, fuzz.grpc_case)
    fuzz.assert_clean("grpc-messages")


# --- faults -------------------------------------------------------------------------------------------------


def test_faults(fuzz: FuzzRun) -> None:
    """Clients that hang up (mid-stream, before the reply, mid-body) or whose gRPC deadline expires: each is
    followed by an ordinary request, which must be served."""
    port = fuzz.stack.ports.http
    faults = {
        "SSE client hangs up after the first event": lambda: fz.fault_sse_disconnect(fuzz.base, 1),
        "SSE client hangs up before any event": lambda: fz.fault_sse_disconnect(fuzz.base, 0),
        "HTTP client hangs up right after sending": lambda: fz.fault_hang_up_before_reply(port),
        "HTTP client hangs up mid-body": lambda: fz.fault_partial_body(port),
        "gRPC stream cancelled after the first chunk": lambda: fz.fault_grpc_cancel(fuzz.channel),
        "gRPC deadline of 50 ms": lambda: fz.fault_grpc_deadline(fuzz.channel, 0.05),
    }
    after = fz.HttpCase("faults", "", {"model": fz.MODEL, "messages": fz.USER, "max_tokens": 2})
    for _ in range(FAULT_ROUNDS):
        for name, inject in faults.items():
            try:
                saw = inject()
            except (httpx.HTTPError, OSError) as error:
                saw = f"{type(error).__name__}"
            after.description = f"request right after: {name}"
            fuzz.results.fault(name, saw, fuzz.http_case(after).status)
    fuzz.assert_clean("faults")


# --- the run as a whole (keep last) -------------------------------------------------------------------------


def test_service_intact_after_fuzzing(fuzz: FuzzRun) -> None:
    """The engine worker never restarted, the canary was served throughout, /health is 200, nothing runs."""
    findings = fuzz.watch.finish()
    assert not findings["problems"], "\n".join(findings["problems"])
