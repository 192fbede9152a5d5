"""The edge's TLS, filled into gateway/envoy.yaml's three `transport_socket` placeholders (`null`: plaintext).

- Public HTTP listener (CHATWIRE_TLS_CERT_FILE, CHATWIRE_TLS_KEY_FILE): TLS 1.2 and 1.3, ALPN h2 and http/1.1,
  Mozilla's "intermediate" cipher list for TLS 1.2 (1.3's suites are fixed by BoringSSL).
- Internal gRPC listener and the connections to the replicas (CHATWIRE_MTLS_*, as the servers read them, see
  `chatwire_server.tls`): mutual TLS with that CA; callers must present a certificate it signed, and Envoy presents
  its own to the replicas (health checks included).

Certificates reach Envoy through file-based SDS with a watched directory: replacing the files (written, then
renamed into place, as Kubernetes and cert-manager do) serves the new certificate to new connections without a
restart, while connections already open keep theirs.

Standard library only: the gateway image runs this file as a script (`python3 envoy_tls.py SDS_DIR` prints the
placeholders as shell assignments), without the service's packages.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

EDGE_SETTINGS = ("CHATWIRE_TLS_CERT_FILE", "CHATWIRE_TLS_KEY_FILE")
# The variables chatwire_server.tls reads on the servers (a test checks they agree).
MUTUAL_SETTINGS = ("CHATWIRE_MTLS_CA_FILE", "CHATWIRE_MTLS_CERT_FILE", "CHATWIRE_MTLS_KEY_FILE")
TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
# Mozilla's intermediate configuration (v5.7) for TLS 1.2, less the DHE suites BoringSSL does not implement.
INTERMEDIATE_CIPHERS = [
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
]
TLS_PARAMS = {
    "tls_minimum_protocol_version": "TLSv1_2",
    "tls_maximum_protocol_version": "TLSv1_3",
    "cipher_suites": INTERMEDIATE_CIPHERS,
}


def _files(environ: Mapping[str, str], names: tuple[str, ...]) -> tuple[Path, ...] | None:
    """The files `names` name: all of them, or None when none is set."""
    values = [environ.get(name, "") for name in names]
    if not any(values):
        return None
    if not all(values):
        raise ValueError(f"set all of {', '.join(names)}, or none")
    return tuple(Path(value) for value in values)


def edge_certificate(environ: Mapping[str, str] = os.environ) -> tuple[Path, ...] | None:
    """The public listener's certificate (chain) and key files, if TLS is on there."""
    return _files(environ, EDGE_SETTINGS)


def transport_sockets(sds_dir: Path, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The placeholders' values (one-line YAML), writing the SDS files they name into `sds_dir`."""
    values = {"CHATWIRE_HTTP_TLS": "null", "CHATWIRE_GRPC_EDGE_TLS": "null", "CHATWIRE_UPSTREAM_TLS": "null"}
    edge, mutual = edge_certificate(environ), _files(environ, MUTUAL_SETTINGS)
    if edge is None and mutual is None:
        return values
    sds_dir.mkdir(parents=True, exist_ok=True)

    def secret(name: str, body: dict[str, Any]) -> dict[str, Any]:
        path = sds_dir / f"{name}.json"
        resource = {"@type": f"{TLS}Secret", "name": name, **body}
        path.write_text(json.dumps({"resources": [resource]}))
        return {"name": name, "sds_config": {"path_config_source": {"path": str(path)}, "resource_api_version": "V3"}}

    def certificate(name: str, cert: Path, key: Path) -> dict[str, Any]:
        files = {"certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}
        return secret(name, {"tls_certificate": {**files, "watched_directory": {"path": str(cert.parent)}}})

    def socket(context: str, body: dict[str, Any]) -> str:
        return json.dumps({"name": "envoy.transport_sockets.tls", "typed_config": {"@type": f"{TLS}{context}", **body}})

    if edge is not None:
        common = {
            "tls_params": TLS_PARAMS,
            "alpn_protocols": ["h2", "http/1.1"],
            "tls_certificate_sds_secret_configs": [certificate("edge_certificate", *edge)],
        }
        values["CHATWIRE_HTTP_TLS"] = socket("DownstreamTlsContext", {"common_tls_context": common})
    if mutual is not None:
        ca_file, cert_file, key_file = mutual
        own = certificate("mutual_certificate", cert_file, key_file)
        trusted = {"trusted_ca": {"filename": str(ca_file)}, "watched_directory": {"path": str(ca_file.parent)}}
        ca = secret("mutual_ca", {"validation_context": trusted})
        common = {
            "tls_params": TLS_PARAMS,
            "alpn_protocols": ["h2"],
            "tls_certificate_sds_secret_configs": [own],
            "validation_context_sds_secret_config": ca,
        }
        inbound = {"common_tls_context": common, "require_client_certificate": True}
        values["CHATWIRE_GRPC_EDGE_TLS"] = socket("DownstreamTlsContext", inbound)
        values["CHATWIRE_UPSTREAM_TLS"] = socket("UpstreamTlsContext", {"common_tls_context": common})
    return values


def main() -> None:
    """The gateway image: the placeholders' values as shell assignments, SDS files in argv[1]."""
    for name, value in transport_sockets(Path(sys.argv[1])).items():
        print(f"export {name}={shlex.quote(value)}")


if __name__ == "__main__":
    main()
