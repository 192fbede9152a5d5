"""The gRPC server: ChatService, health, reflection, graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from chatwire.v1 import chat_service_pb2, chat_service_pb2_grpc
from chatwire_server import logs, metrics, tracing
from chatwire_server.api import rpc
from chatwire_server.api.auth import Authenticator
from chatwire_server.api.servicer import ChatServicer
from chatwire_server.edge import envoy_tracing
from chatwire_server.limits import Limiter
from chatwire_server.registry import ModelRegistry
from chatwire_server.tls import Mutual

log = logging.getLogger(__name__)

SERVICE_NAME = chat_service_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config" / "models.toml"
# How long in-flight requests may finish after SIGTERM before they are cancelled.
SHUTDOWN_GRACE_S = 10.0
# How long a stopping server says NOT_SERVING before it refuses new requests (replicas behind the edge).
DRAIN_NOTICE_S = float(os.environ.get("CHATWIRE_DRAIN_NOTICE_S", "0"))
# Above what the edge lets through (4 MiB bodies, 32 KiB of headers), so whatever Envoy accepts decodes here and
# a request too large is refused by the edge with 413/431, never reset by gRPC in between.
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_metadata_size", 64 * 1024),
    ("grpc.absolute_max_metadata_size", 64 * 1024),
]


def default_replica_name(port: int) -> str:
    """What a server answers in `x-chatwire-replica` unless CHATWIRE_REPLICA names it: host name and port."""
    return f"{socket.gethostname()}:{port}"


async def serve(host: str, port: int, config: Path, metrics_host: str = "127.0.0.1", metrics_port: int = 9464) -> None:
    """Load the models, serve until SIGTERM/SIGINT, then drain."""
    authenticator = Authenticator.from_environment()
    if not authenticator.enabled:
        log.warning(
            "AUTHENTICATION IS OFF: no API keys configured (CHATWIRE_API_KEYS / CHATWIRE_API_KEYS_FILE); "
            "anyone who can reach the ports can use the service. Fine on a laptop, not on a network."
        )
    registry = await asyncio.to_thread(ModelRegistry.from_config, config)
    for entry in registry.all():
        metrics.watch_engine(entry.id, entry.engine.stats)
    bound_metrics = metrics.serve(metrics_host, metrics_port)
    log.info("metrics", extra={"url": f"http://{metrics_host}:{bound_metrics}/metrics"})
    server = grpc.aio.server(options=GRPC_OPTIONS)
    limiter = Limiter.from_environment()
    await limiter.open()
    traced = tracing.configure()
    # Replicas tell callers (and the edge's access log) which of them answered: a pod's name in Kubernetes.
    replica = os.environ.get("CHATWIRE_REPLICA") or default_replica_name(port)
    servicer = ChatServicer(registry, authenticator, limiter, replica=replica)
    rpc.add_servicer(chat_service_pb2_grpc.add_ChatServiceServicer_to_server, servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME, health.SERVICE_NAME), server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    mutual = Mutual.from_environment()
    if mutual is None:
        log.warning(
            "PLAINTEXT gRPC: no CHATWIRE_MTLS_* certificates; whoever reaches the port talks to the service "
            "unencrypted. Fine on a laptop or behind a mesh that encrypts, not on a network."
        )
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        bound = server.add_secure_port(f"{host}:{port}", mutual.server_credentials())
    await server.start()
    # Kubernetes' gRPC probes cannot present a client certificate: with mutual TLS, health (only) is also served
    # in plaintext on CHATWIRE_HEALTH_PORT for them, when set.
    probes = None
    if mutual is not None and (health_port := int(os.environ.get("CHATWIRE_HEALTH_PORT", "0"))):
        probes = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, probes)
        probes.add_insecure_port(f"{host}:{health_port}")
        await probes.start()
    log.info(
        "serving",
        extra={
            "address": f"{host}:{bound}",
            "replica": replica,
            "models": [e.id for e in registry.all()],
            "rate_limits": limiter.where,
            "transport": "mutual TLS" if mutual else "plaintext",
            "tracing": envoy_tracing.protocol() if traced else "off",
        },
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("shutting down", extra={"grace_s": SHUTDOWN_GRACE_S, "notice_s": DRAIN_NOTICE_S})
    await health_servicer.enter_graceful_shutdown()
    # Behind a balancer, keep serving until its health checks have seen NOT_SERVING and sent new work elsewhere.
    await asyncio.sleep(DRAIN_NOTICE_S)
    await server.stop(SHUTDOWN_GRACE_S)
    if probes is not None:
        await probes.stop(0)
    await registry.close()
    await limiter.close()
    await asyncio.to_thread(tracing.shutdown)
    log.info("stopped")


def main() -> None:
    """Command line entry point: `python -m chatwire_server`."""
    parser = argparse.ArgumentParser(description="chatwire gRPC chat completion server")
    parser.add_argument("--host", default=os.environ.get("CHATWIRE_GRPC_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("CHATWIRE_GRPC_PORT", "50051")))
    parser.add_argument("--config", type=Path, default=Path(os.environ.get("CHATWIRE_CONFIG", DEFAULT_CONFIG)))
    parser.add_argument("--log-level", default=os.environ.get("CHATWIRE_LOG_LEVEL", "INFO"))
    parser.add_argument("--metrics-host", default=os.environ.get("CHATWIRE_METRICS_HOST", "127.0.0.1"))
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("CHATWIRE_METRICS_PORT", "9464")))
    args = parser.parse_args()
    logs.configure(args.log_level)
    try:
        asyncio.run(serve(args.host, args.port, args.config, args.metrics_host, args.metrics_port))
    except (OSError, ValueError, KeyError) as exc:  # a bad config or model file: say so, no traceback
        log.error("cannot start", extra={"error": f"{type(exc).__name__}: {exc}", "config": str(args.config)})
        sys.exit(2)
