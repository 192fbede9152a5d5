"""Fixtures: the real stack (gRPC server with the real model, real Envoy) on free ports."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import jsonschema
import openai
import pytest
from referencing import Registry, Resource

from chatwire.v1 import chat_service_pb2_grpc
from chatwire_server.edge import stack
from chatwire_server.server import default_replica_name

MODEL = "smollm2-135m-instruct"
# CHATWIRE_TEST_SHUFFLE=<seed>: run the collected tests in a shuffled order (a check that none depends on another's
# leftovers, such as what the engine's prefix cache holds).
SHUFFLE_SEED = os.environ.get("CHATWIRE_TEST_SHUFFLE")
# Every end-of-generation token of the model banned: a reply runs to max_tokens (banning <|im_end|> alone still
# let a sampled <|endoftext|> end one now and then).
NO_END_BIAS = {"0": -100, "2": -100, "4": -100}
NO_END = {"logit_bias": NO_END_BIAS}
SPEC = json.loads((Path(__file__).parent / "spec" / "chat_completions_schemas.json").read_text())
_base_ids = itertools.count()
ROOT = Path(__file__).resolve().parents[1]
# Each language's conformance program (clients/<language>): reads one call as JSON on stdin, makes it through the
# language's generated stubs and chatwire helper, prints what came back as OpenAI JSON.
CONFORMANCE = {
    "typescript": ["node", str(ROOT / "clients/typescript/dist/conformance.js")],
    "go": [str(ROOT / "build/clients/go/chatwire-conformance")],
}


@dataclass
class Replica:
    """One gRPC server of a stack."""

    grpc: int
    metrics: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        """What it answers in `x-chatwire-replica`."""
        return default_replica_name(self.grpc)


@dataclass
class Stack:
    """A running stack and where to reach it."""

    ports: stack.Ports
    server_log: Path
    envoy_log: Path
    server_pid: int = 0
    replicas: list[Replica] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.http}/v1"

    @property
    def grpc_target(self) -> str:
        """The first replica's own gRPC port."""
        return f"127.0.0.1:{self.ports.grpc}"

    @property
    def grpc_edge_target(self) -> str:
        """The edge's internal gRPC listener, balancing over every replica."""
        return f"127.0.0.1:{self.ports.grpc_edge}"


def _unique_base_id(ports: stack.Ports) -> int:
    # Envoy's shared-memory id: the admin port is unique while this Envoy holds it.
    return ports.admin * 10 + next(_base_ids) % 10


@contextlib.contextmanager
def run_envoy(ports: stack.Ports, log_path: Path, **edge: str) -> Iterator[subprocess.Popen[bytes]]:
    """Envoy on `ports` (edge settings overridden by `edge`), ready, stopped afterwards."""
    config = log_path.with_suffix(".yaml")
    config.write_text(stack.render_envoy_config(ports, sds_dir=log_path.parent / "sds", **edge))
    with log_path.open("wb") as log:
        envoy = stack.start_envoy(config, _unique_base_id(ports), log)
        try:
            stack.wait_for_envoy(ports.admin, envoy)
            yield envoy
        finally:
            stack.stop(envoy)


@contextlib.contextmanager
def run_server(
    port: int,
    log_path: Path,
    config: Path = stack.DEFAULT_CONFIG,
    env: dict[str, str] | None = None,
    metrics_port: int | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """The gRPC server (by default with the default model), serving, stopped afterwards."""
    with log_path.open("wb") as log:
        server = stack.start_server(port, log, config=config, env=env, metrics_port=metrics_port)
        try:
            stack.wait_for_server(port, server, env=env)
            yield server
        finally:
            stack.stop(server)


def small_replicas(tmp_path: Path, **settings: int) -> Path:
    """The default model config with a smaller KV cache (three replicas share this machine) and `settings`."""
    text = stack.DEFAULT_CONFIG.read_text().replace("kv_cells = 32768", "kv_cells = 8192")
    text = text.replace("prefix_cache_tokens = 4096", "prefix_cache_tokens = 2048")
    for name, value in settings.items():
        text, found = re.subn(rf"^{name} = \d+$", f"{name} = {value}", text, flags=re.M)
        assert found == 1, name
    config = tmp_path / "models.toml"
    config.write_text(text)
    return config


@dataclass
class Redis:
    """A redis-server on loopback (Debian's, as `make run` starts it), which a test may stop, kill and restart."""

    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = stack.start_redis(self.port, self.log.open("ab"))
        stack.wait_for_redis(self.port, self.process)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            stack.stop(self.process)


@contextlib.contextmanager
def run_redis(log_path: Path) -> Iterator[Redis]:
    """A redis-server on a free port, answering, stopped afterwards."""
    redis = Redis(stack.free_port(), log_path)
    redis.start()
    try:
        yield redis
    finally:
        redis.stop()


# The ports `make run` listens on, by their variables' names (CHATWIRE_<NAME>_PORT).
MAKE_RUN_PORTS = ("HTTP", "GRPC", "GRPC_EDGE", "ADMIN", "METRICS")


def free_ports(names: tuple[str, ...] = MAKE_RUN_PORTS) -> dict[str, int]:
    """A free port for each name."""
    return {name: stack.free_port() for name in names}


def make_run_env(ports: dict[str, int], **settings: str) -> dict[str, str]:
    """`make run`'s environment: each of `ports` as CHATWIRE_<NAME>_PORT, then `settings`."""
    return {**stack.python_env(), **{f"CHATWIRE_{name}_PORT": str(port) for name, port in ports.items()}, **settings}


@contextlib.contextmanager
def make_run(env: dict[str, str], log_path: Path, timeout: float = 120) -> Iterator[subprocess.Popen[bytes]]:
    """`make run` (`python -m chatwire_server.edge.stack`) with `env`, once it says it is up; stopped afterwards
    if the test has not stopped it."""
    with log_path.open("wb") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "chatwire_server.edge.stack"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + timeout
            while "chatwire is up" not in log_path.read_text() and time.monotonic() < deadline:
                assert launcher.poll() is None, log_path.read_text()
                time.sleep(0.2)
            yield launcher
        finally:
            stack.stop(launcher)


def engine_workers(server_pid: int) -> list[int]:
    """Process ids of the server's engine workers (its children, whichever thread started them)."""
    tasks = Path(f"/proc/{server_pid}/task")
    return [int(pid) for task in tasks.iterdir() for pid in (task / "children").read_text().split()]


def metric(port: int, name: str, labels: dict[str, str] | None = None) -> float | None:
    """A counter or gauge of the service's /metrics on `port`, summed over the series whose labels include
    `labels`; None when no series matches."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    values = []
    for match in re.finditer(rf"^{re.escape(name)}(?:{{([^}}]*)}})? (\S+)$", text, re.M):
        series = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(series.get(key) == value for key, value in (labels or {}).items()):
            values.append(float(match.group(2)))
    return sum(values) if values else None


def logged(path: Path, request_id: str, timeout: float = 10, **match: object) -> dict[str, Any]:
    """The JSON log record of `request_id` in `path` (Envoy's access log, a server's log) holding `match`,
    waiting for it up to `timeout` seconds: Envoy flushes its access log about once a second."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text(errors="replace").splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{") and request_id in line]
        found = [r for r in records if r.get("request_id") == request_id and match.items() <= r.items()]
        if found or time.monotonic() > deadline:
            assert found, f"no record of {request_id} in {path}"
            return found[0]
        time.sleep(0.2)


def _dump_logs(*paths: Path) -> None:
    for path in paths:
        if path.exists():
            print(f"\n----- {path.name} (last 60 lines) -----")
            print("\n".join(path.read_text(errors="replace").splitlines()[-60:]))


@contextlib.contextmanager
def run_stack(
    request: pytest.FixtureRequest,
    config: Path = stack.DEFAULT_CONFIG,
    server_env: dict[str, str] | None = None,
    replicas: int = 1,
    **edge: str,
) -> Iterator[Stack]:
    """`replicas` servers (with `server_env`) behind Envoy (with `edge` settings) on free ports; logs printed on
    failure."""
    logs = Path(tempfile.mkdtemp(prefix="chatwire-test-"))
    servers = [
        Replica(stack.free_port(), stack.free_port(), logs / ("server.log" if i == 0 else f"server-{i}.log"))
        for i in range(replicas)
    ]
    ports = stack.Ports(
        http=stack.free_port(),
        grpc=servers[0].grpc,
        admin=stack.free_port(),
        metrics=servers[0].metrics,
        grpc_edge=stack.free_port(),
        more_replicas=tuple((r.grpc, r.metrics) for r in servers[1:]),
    )
    running = Stack(ports, servers[0].log, logs / "envoy.log", replicas=servers)
    try:
        with contextlib.ExitStack() as started:
            for replica in servers:
                env = {**stack.replica_env(replicas), **(server_env or {})}
                replica.process = started.enter_context(
                    run_server(replica.grpc, replica.log, config, env, replica.metrics)
                )
            envoy = started.enter_context(run_envoy(ports, running.envoy_log, **edge))
            if replicas > 1:
                stack.wait_for_replicas(ports.admin, replicas, envoy)
            running.server_pid = servers[0].process.pid if servers[0].process else 0
            try:
                yield running
            finally:  # replicas drain side by side (each gives notice first), not one after another
                for replica in servers:
                    if replica.process and replica.process.poll() is None:
                        replica.process.terminate()
    finally:
        if request.session.testsfailed:
            _dump_logs(*(r.log for r in servers), running.envoy_log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """With CHATWIRE_TEST_SHUFFLE: the files in a shuffled order, and each file's tests shuffled (a file's tests
    stay together, so that its module-scoped fixtures start once)."""
    if SHUFFLE_SEED is None:
        return
    shuffle = random.Random(SHUFFLE_SEED).shuffle
    files: dict[str, list[pytest.Item]] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], []).append(item)
    groups = list(files.values())
    shuffle(groups)
    for group in groups:
        shuffle(group)
    items[:] = [item for group in groups for item in group]


@pytest.fixture(scope="session")
def built_clients() -> None:
    """Builds (or finds up to date) both languages' clients, exactly as `make clients` does."""
    subprocess.run(["make", "--no-print-directory", "-s", "clients"], cwd=ROOT, check=True, timeout=900)


@pytest.fixture(scope="session")
def chatwire(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The whole stack with the default config, shared by the session."""
    with run_stack(request) as running:
        yield running


@pytest.fixture(scope="session")
def client(chatwire: Stack) -> openai.OpenAI:
    """The official OpenAI SDK pointed at the edge."""
    return openai.OpenAI(base_url=chatwire.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def grpc_stub(chatwire: Stack) -> Iterator[chat_service_pb2_grpc.ChatServiceStub]:
    """A gRPC stub talking to the server directly."""
    with grpc.insecure_channel(chatwire.grpc_target) as channel:
        yield chat_service_pb2_grpc.ChatServiceStub(channel)


# Every header a reply through the edge may carry (the guard in gateway/envoy.yaml drops the rest): the codec's
# framing, the edge's own, the service's public ones, and CORS's.
EDGE_REPLY_HEADERS = frozenset(
    {
        *("content-type", "content-length", "transfer-encoding", "connection", "date", "server"),
        *("x-request-id", "cache-control", "openai-processing-ms", "allow", "vary"),
        *("x-chatwire-replica", "retry-after"),
        *(f"x-ratelimit-{what}-{kind}" for what in ("limit", "remaining", "reset") for kind in ("requests", "tokens")),
        *(f"access-control-{name}" for name in ("allow-origin", "allow-credentials", "allow-methods")),
        *(f"access-control-{name}" for name in ("allow-headers", "expose-headers", "max-age")),
    }
)


def _closed_objects(schema: Any) -> Any:
    """The spec with `additionalProperties: false` wherever an object lists its properties and says nothing
    about others: the spec itself admits any extra key, so a vendor's field relayed as is (llama-server's
    `id` in every token logprob) would pass unnoticed. The response schemas compose no objects with `allOf`, so
    closing each object on its own is exact for them."""
    if isinstance(schema, list):
        return [_closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed_objects(value) for key, value in schema.items()}
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema:
        closed["additionalProperties"] = False
    return closed


_registry: Registry[Any] = (
    Registry()
    .with_resource("urn:openai-chat", Resource.from_contents(SPEC))
    .with_resource("urn:openai-chat-closed", Resource.from_contents(_closed_objects(SPEC)))
)


def assert_valid(instance: Any, definition: str, *, exact: bool = True) -> None:
    """Fail unless `instance` validates against the spec's `definition` schema; `exact`, also unless every key it
    holds is one the spec names (OpenAI's replies hold no others)."""
    spec = "urn:openai-chat-closed" if exact else "urn:openai-chat"
    schema = {"$schema": SPEC["$schema"], "$ref": f"{spec}#/definitions/{definition}"}
    validator = jsonschema.Draft202012Validator(schema, registry=_registry)
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.path))
    assert not errors, f"{definition} invalid: " + "; ".join(
        f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:5]
    )


def parse_sse(body: str) -> list[Any]:
    """The `data:` payloads of an SSE body: JSON objects, and the final "[DONE]" as a string."""
    events = []
    for block in body.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), f"not an SSE data event: {block!r}"
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events
