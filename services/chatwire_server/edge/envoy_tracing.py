"""The edge's traces, from the standard OTEL_* variables the servers read too (see `chatwire_server.tracing`).

Fills gateway/envoy.yaml's two tracing placeholders: `CHATWIRE_TRACING`, each listener's `tracing` (null: off),
and `CHATWIRE_OTLP_CLUSTER`, the collector Envoy exports to (a loopback stand-in nobody calls while off).
- OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT: where (http:// or https://; for
  http/protobuf the latter gets `/v1/traces` appended, as the SDKs do). Unset, OTEL_SDK_DISABLED=true or
  OTEL_TRACES_EXPORTER=none: no tracing.
- OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL: `http/protobuf` (the specification's default) or `grpc`.
- OTEL_EXPORTER_OTLP_(TRACES_)HEADERS: sent with each export (a hosted collector's API key).
- OTEL_SERVICE_NAME: the edge reports as `<name>-edge` (default `chatwire-edge`); OTEL_RESOURCE_ATTRIBUTES
  through Envoy's environment resource detector.
- OTEL_TRACES_SAMPLER(_ARG): Envoy's `random_sampling`, for traces the edge starts; (parentbased_)traceidratio
  gives the ratio, always_off 0, anything else 100 %. The servers follow the edge's decision (parent-based).

Standard library only: the gateway image runs this file as a script (`python3 envoy_tracing.py` prints the
placeholders as shell assignments), without the service's packages.
"""

from __future__ import annotations

import json
import os
import shlex
import urllib.parse
from collections.abc import Mapping
from typing import Any

CLUSTER = "otlp_collector"
# How long Envoy waits on one export before it drops that batch.
EXPORT_TIMEOUT = "2s"
SYSTEM_CAS = "/etc/ssl/certs/ca-certificates.crt"
MAX_CACHED_SPANS = 4096


def _setting(environ: Mapping[str, str], name: str) -> str:
    """OTEL_EXPORTER_OTLP_TRACES_<name>, else OTEL_EXPORTER_OTLP_<name>."""
    return environ.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or environ.get(f"OTEL_EXPORTER_OTLP_{name}", "")


def exporting(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces."""
    disabled = environ.get("OTEL_SDK_DISABLED", "").lower() == "true"
    none = environ.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none"
    return bool(_setting(environ, "ENDPOINT")) and not disabled and not none


def endpoint(environ: Mapping[str, str] = os.environ) -> str:
    """Where the spans go (as the environment names it)."""
    return _setting(environ, "ENDPOINT")


def protocol(environ: Mapping[str, str] = os.environ) -> str:
    """The OTLP protocol to export with."""
    name = _setting(environ, "PROTOCOL") or "http/protobuf"
    if name not in ("grpc", "http/protobuf"):
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL is {name!r}: chatwire exports 'grpc' or 'http/protobuf'")
    return name


def sampling_percent(environ: Mapping[str, str] = os.environ) -> float:
    """The share of new traces to sample, in percent, as OTEL_TRACES_SAMPLER(_ARG) say."""
    sampler = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    if sampler in ("always_off", "parentbased_always_off"):
        return 0.0
    if sampler in ("traceidratio", "parentbased_traceidratio"):
        return min(max(float(environ.get("OTEL_TRACES_SAMPLER_ARG") or 1.0), 0.0), 1.0) * 100
    return 100.0


def _headers(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """OTEL_EXPORTER_OTLP_HEADERS: `key=value,...`, URL-encoded values."""
    pairs = (item.split("=", 1) for item in _setting(environ, "HEADERS").split(",") if "=" in item)
    return [(key.strip().lower(), urllib.parse.unquote(value.strip())) for key, value in pairs]


def _cluster(host: str, port: int, *, http2: bool, tls: str | None) -> dict[str, Any]:
    """The collector's cluster; `tls`: the CA file to verify it with, for an https:// endpoint."""
    address = {"address": host, "port_value": port}
    cluster: dict[str, Any] = {
        "name": CLUSTER,
        "type": "STRICT_DNS",  # a collector's service name in Kubernetes or compose
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": address}}}]}],
        },
    }
    if http2:
        options = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        cluster["typed_extension_protocol_options"] = {
            options: {"@type": f"type.googleapis.com/{options}", "explicit_http_config": {"http2_protocol_options": {}}}
        }
    if tls:
        context = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": f"type.googleapis.com/{context}",
                "sni": host,
                "common_tls_context": {"validation_context": {"trusted_ca": {"filename": tls}}},
            },
        }
    return cluster


def placeholders(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The placeholders' values (one-line YAML)."""
    if not exporting(environ):
        unused = _cluster("127.0.0.1", 4318, http2=False, tls=None)
        return {"CHATWIRE_TRACING": "null", "CHATWIRE_OTLP_CLUSTER": json.dumps(unused)}
    grpc = protocol(environ) == "grpc"
    url = urllib.parse.urlsplit(endpoint(environ))
    # https: verified against OTEL_EXPORTER_OTLP_CERTIFICATE, or the system's CAs (Debian's bundle).
    tls = (_setting(environ, "CERTIFICATE") or SYSTEM_CAS) if url.scheme == "https" else None
    host, port = url.hostname or "localhost", url.port or (443 if tls else 4317 if grpc else 4318)
    headers = _headers(environ)
    exporter: dict[str, Any]
    if grpc:
        service = {"envoy_grpc": {"cluster_name": CLUSTER}, "timeout": EXPORT_TIMEOUT}
        exporter = {"grpc_service": {**service, "initial_metadata": [{"key": k, "value": v} for k, v in headers]}}
    else:
        path = url.path if environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") else url.path.rstrip("/") + "/v1/traces"
        uri = urllib.parse.urlunsplit((url.scheme, url.netloc, path, "", ""))
        exporter = {
            "http_service": {
                "http_uri": {"uri": uri, "cluster": CLUSTER, "timeout": EXPORT_TIMEOUT},
                "request_headers_to_add": [{"header": {"key": k, "value": v}} for k, v in headers],
            }
        }
    detector = "envoy.extensions.tracers.opentelemetry.resource_detectors.v3.EnvironmentResourceDetectorConfig"
    tracing = {
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                **exporter,
                "service_name": f"{environ.get('OTEL_SERVICE_NAME') or 'chatwire'}-edge",
                # Spans a worker thread holds between exports (gateway/envoy.yaml flushes at 512 or each second);
                # beyond this, new ones are dropped rather than held.
                "max_cache_size": MAX_CACHED_SPANS,
                # OTEL_RESOURCE_ATTRIBUTES (Envoy warns at every start if the detector finds it unset).
                "resource_detectors": [
                    {
                        "name": "envoy.tracers.opentelemetry.resource_detectors.environment",
                        "typed_config": {"@type": f"type.googleapis.com/{detector}"},
                    }
                ]
                if environ.get("OTEL_RESOURCE_ATTRIBUTES")
                else [],
            },
        },
        "random_sampling": {"value": sampling_percent(environ)},
        # A span of its own for each try at a replica (the edge retries a full replica on another one).
        "spawn_upstream_span": True,
    }
    return {
        "CHATWIRE_TRACING": json.dumps(tracing),
        "CHATWIRE_OTLP_CLUSTER": json.dumps(_cluster(host, port, http2=grpc, tls=tls)),
    }


def main() -> None:
    """The gateway image: the placeholders' values as shell assignments."""
    for name, value in placeholders().items():
        print(f"export {name}={shlex.quote(value)}")


if __name__ == "__main__":
    main()
