"""TLS at the public edge and mutual TLS inside, on loopback with certificates made for the session: HTTPS for the
OpenAI SDK (unary and stream) with HTTP/2 by ALPN, old TLS and plaintext refused, a certificate of another CA
refused by clients, certificates rotated without a restart; gRPC callers of a replica and of the edge's internal
listener need a client certificate of the CA, and the replica logs who called."""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from cryptography import x509
from google.protobuf import json_format

import fuzzing as fz
from chatwire.v1 import chat_completion_pb2, chat_service_pb2_grpc
from chatwire_server import tls
from chatwire_server.edge import envoy_tls, stack
from chatwire_server.edge.certs import CLIENT_SPIFFE_ID, Authority
from conftest import (
    CONFORMANCE,
    MODEL,
    NO_END_BIAS,
    Stack,
    assert_valid,
    free_ports,
    make_run,
    make_run_env,
    parse_sse,
    run_stack,
)
from test_readme import TLS_EXAMPLES

pytestmark = pytest.mark.tls

HI = [{"role": "user", "content": "Hi"}]


@dataclass
class Certificates:
    directory: Path
    authority: Authority
    other: Authority  # another CA, trusted by nobody here

    def path(self, name: str) -> str:
        return str(self.directory / name)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("certs")
    authority, other = Authority(), Authority("another CA")
    authority.pem.write(directory, "ca")
    other.pem.write(directory, "other-ca")
    # The edge's and the replicas' certificate (server and client use: Envoy presents it to the replicas too).
    authority.issue("localhost", hosts=("localhost", "127.0.0.1")).write(directory, "server")
    authority.issue("caller", uris=(CLIENT_SPIFFE_ID,), server=False).write(directory, "client")
    other.issue("intruder", uris=("spiffe://elsewhere/intruder",), server=False).write(directory, "intruder")
    other.issue("localhost", hosts=("localhost", "127.0.0.1")).write(directory, "impostor")
    return Certificates(directory, authority, other)


def mutual_env(certs: Certificates) -> dict[str, str]:
    return {
        "CHATWIRE_MTLS_CA_FILE": certs.path("ca.pem"),
        "CHATWIRE_MTLS_CERT_FILE": certs.path("server.pem"),
        "CHATWIRE_MTLS_KEY_FILE": certs.path("server-key.pem"),
    }


@pytest.fixture(scope="module")
def secure(request: pytest.FixtureRequest, certificates: Certificates) -> Iterator[Stack]:
    """Replicas with mutual TLS behind an edge serving HTTPS; the edge's certificate in its own directory, which
    the rotation test replaces."""
    edge = certificates.directory / "edge"
    edge.mkdir()
    certificates.authority.issue("localhost", hosts=("localhost", "127.0.0.1")).write(edge, "edge")
    tls = {"CHATWIRE_TLS_CERT_FILE": str(edge / "edge.pem"), "CHATWIRE_TLS_KEY_FILE": str(edge / "edge-key.pem")}
    mutual = mutual_env(certificates)
    # The fuzz stack's bounds (tests/test_fuzz.py), for the fuzz cases below: a mutated max_tokens is legitimate
    # work, not a fault, and would take minutes on 2 cores.
    config = certificates.directory / "models.toml"
    config.write_text(
        stack.DEFAULT_CONFIG.read_text()
        .replace("# max_context = 8192", "max_context = 1024")
        .replace("max_completion_budget = 65536", "max_completion_budget = 1024")
    )
    # Two replicas: Envoy's health checks (over mutual TLS) must pass on both before the stack counts as up.
    with run_stack(request, config, server_env=mutual, replicas=2, **mutual, **tls) as running:
        yield running


def https_url(running: Stack) -> str:
    return f"https://127.0.0.1:{running.ports.http}/v1"


def test_the_openai_sdk_over_https_unary_and_stream(secure: Stack, certificates: Certificates) -> None:
    with httpx.Client(verify=certificates.path("ca.pem"), timeout=60) as http:
        client = openai.OpenAI(base_url=https_url(secure), api_key="unused", max_retries=0, http_client=http)
        reply = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4)  # type: ignore[arg-type]
        assert_valid(reply.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
        stream = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4, stream=True)  # type: ignore[arg-type]
        chunks = list(stream)
        assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_http2_is_negotiated_by_alpn(secure: Stack, certificates: Certificates) -> None:
    with httpx.Client(verify=certificates.path("ca.pem"), http2=True, timeout=30) as http:
        reply = http.get(f"{https_url(secure)}/models")
    assert reply.status_code == 200 and reply.http_version == "HTTP/2"


def test_tls_below_1_2_and_plaintext_are_refused(secure: Stack, certificates: Certificates) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(certificates.path("ca.pem"))
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", secure.ports.http), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            old.wrap_socket(raw, server_hostname="localhost")
    # Plaintext HTTP to the TLS port: the connection closes, nothing hangs.
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{secure.ports.http}/v1/models", timeout=10)


def test_a_client_of_another_ca_refuses_the_edge(secure: Stack, certificates: Certificates) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{https_url(secure)}/models", verify=certificates.path("other-ca.pem"), timeout=10)


def edge_serial(running: Stack, certificates: Certificates) -> int:
    context = ssl.create_default_context(cafile=certificates.path("ca.pem"))
    with socket.create_connection(("127.0.0.1", running.ports.http), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_certificates_rotate_without_a_restart_and_open_streams_go_on(
    secure: Stack, certificates: Certificates
) -> None:
    before = edge_serial(secure, certificates)
    body = {"model": MODEL, "messages": HI, "max_tokens": 120, "stream": True, "logit_bias": NO_END_BIAS}
    with httpx.Client(verify=certificates.path("ca.pem"), timeout=120) as http:
        with http.stream("POST", f"{https_url(secure)}/chat/completions", json=body) as stream:
            lines = stream.iter_lines()
            next(lines)
            # New files, written beside and renamed into place (as Kubernetes and cert-manager swap them).
            edge = certificates.directory / "edge"
            fresh = certificates.authority.issue("localhost", hosts=("localhost", "127.0.0.1"))
            fresh.write(edge, "next")
            os.replace(edge / "next-key.pem", edge / "edge-key.pem")
            os.replace(edge / "next.pem", edge / "edge.pem")
            after = before
            deadline = time.monotonic() + 10
            while after == before and time.monotonic() < deadline:
                time.sleep(0.2)
                after = edge_serial(secure, certificates)
            assert after != before
            assert after == x509.load_pem_x509_certificate(fresh.cert).serial_number
            rest = "\n".join(lines)
    events = parse_sse(rest)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"


def grpc_call(target: str, credentials: grpc.ChannelCredentials) -> chat_completion_pb2.CreateChatCompletionResponse:
    request = json_format.ParseDict(
        {"model": MODEL, "messages": HI, "max_tokens": 2}, chat_completion_pb2.CreateChatCompletionRequest()
    )
    with grpc.secure_channel(target, credentials) as channel:
        return chat_service_pb2_grpc.ChatServiceStub(channel).CreateChatCompletion(request, timeout=30)


def credentials(certs: Certificates, ca: str, client: str | None) -> grpc.ChannelCredentials:
    root = Path(certs.path(ca)).read_bytes()
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=root)
    cert, key = Path(certs.path(f"{client}.pem")).read_bytes(), Path(certs.path(f"{client}-key.pem")).read_bytes()
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)


@pytest.mark.parametrize("through", ["replica", "edge"])
def test_grpc_callers_need_a_certificate_of_the_ca(secure: Stack, certificates: Certificates, through: str) -> None:
    target = secure.grpc_target if through == "replica" else secure.grpc_edge_target
    for refused in (credentials(certificates, "ca.pem", None), credentials(certificates, "ca.pem", "intruder")):
        with pytest.raises(grpc.RpcError) as caught:
            grpc_call(target, refused)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError):  # and callers check the server: one of another CA is refused
        grpc_call(target, credentials(certificates, "other-ca.pem", "client"))
    reply = grpc_call(target, credentials(certificates, "ca.pem", "client"))
    assert reply.choices[0].message.content.string_value is not None


def test_the_replica_logs_who_called(secure: Stack, certificates: Certificates) -> None:
    grpc_call(secure.grpc_target, credentials(certificates, "ca.pem", "client"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        peers = [
            json.loads(line).get("peer")
            for line in secure.server_log.read_text().splitlines()
            if line.startswith("{") and '"msg": "request"' in line
        ]
        if CLIENT_SPIFFE_ID in peers:
            # Calls through the edge name the edge's certificate (it is the replica's peer).
            return
        time.sleep(0.2)
    raise AssertionError(f"no request line names {CLIENT_SPIFFE_ID}: {peers}")


def replica_serial(running: Stack, certificates: Certificates) -> int:
    """The serial of the certificate the replica presents to a new connection (with our client certificate)."""
    context = ssl.create_default_context(cafile=certificates.path("ca.pem"))
    context.load_cert_chain(certificates.path("client.pem"), certificates.path("client-key.pem"))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", running.ports.grpc), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_a_replicas_certificate_rotates_without_a_restart(secure: Stack, certificates: Certificates) -> None:
    before = replica_serial(secure, certificates)
    fresh = certificates.authority.issue("localhost", hosts=("localhost", "127.0.0.1"))
    fresh.write(certificates.directory, "next-server")
    os.replace(certificates.directory / "next-server-key.pem", certificates.directory / "server-key.pem")
    os.replace(certificates.directory / "next-server.pem", certificates.directory / "server.pem")
    expected = x509.load_pem_x509_certificate(fresh.cert).serial_number
    deadline = time.monotonic() + 10
    while (serial := replica_serial(secure, certificates)) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert before != expected and serial == expected
    # Envoy took the new pair too (the same files): calls through the edge and to the replica still work.
    assert grpc_call(secure.grpc_edge_target, credentials(certificates, "ca.pem", "client")).choices
    assert grpc_call(secure.grpc_target, credentials(certificates, "ca.pem", "client")).choices


@pytest.mark.parametrize("example", TLS_EXAMPLES, ids=["curl", "openai-sdk"])
def test_the_readmes_tls_examples_as_written(secure: Stack, certificates: Certificates, example: str) -> None:
    """The README's TLS section against this stack: its port and `build/certs/` swapped for the test's."""
    text = example.replace("127.0.0.1:8080", f"127.0.0.1:{secure.ports.http}")
    text = text.replace("build/certs/", f"{certificates.directory}/")
    command = ["bash", "-c", text] if example.startswith("curl") else [sys.executable, "-c", text]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=stack.python_env())
    assert result.returncode == 0, result.stderr
    if example.startswith("curl"):
        assert_valid(json.loads(result.stdout), "CreateChatCompletionResponse")
    else:
        assert result.stdout.strip()


def test_the_edge_and_the_servers_read_the_same_mutual_tls_settings() -> None:
    # envoy_tls is standard library only (the gateway image runs it alone), so it names them itself.
    assert envoy_tls.MUTUAL_SETTINGS == tls.MUTUAL_SETTINGS


@pytest.mark.parametrize("language", sorted(CONFORMANCE))
def test_go_and_typescript_callers_over_mutual_tls_through_the_edge(
    built_clients: None, secure: Stack, certificates: Certificates, language: str
) -> None:
    tls_files = {"ca_file": certificates.path("ca.pem")}
    call = {"address": secure.grpc_edge_target, "rpc": "stream", "request": {"model": MODEL, "messages": HI}}
    call["request"]["max_tokens"] = 4
    for files, served in ((tls_files, False), ({**tls_files, **client_files(certificates)}, True)):
        result = subprocess.run(
            CONFORMANCE[language], input=json.dumps({**call, "tls": files}), capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        outcome = json.loads(result.stdout)
        if served:
            assert "error" not in outcome and outcome["replica"] in {r.name for r in secure.replicas}, outcome
        else:  # no client certificate: the edge refuses the handshake
            assert outcome["error"]["code"] == grpc.StatusCode.UNAVAILABLE.value[0], outcome


def client_files(certs: Certificates) -> dict[str, str]:
    return {"cert_file": certs.path("client.pem"), "key_file": certs.path("client-key.pem")}


@pytest.mark.parametrize("case", ["unary completion", "for await stream with usage"])
def test_the_openai_node_sdk_over_https(secure: Stack, certificates: Certificates, case: str) -> None:
    """tests/node's cases, the CA given to Node as an extra trusted certificate (NODE_EXTRA_CA_CERTS)."""
    node_dir = Path(__file__).parent / "node"
    env = {
        **os.environ,
        "CHATWIRE_BASE_URL": https_url(secure),
        "CHATWIRE_MODEL": MODEL,
        "NODE_EXTRA_CA_CERTS": certificates.path("ca.pem"),
        "NO_COLOR": "1",
    }
    command = ["node", "--test", "--test-reporter=spec", f"--test-name-pattern=^{case}$", "sdk.test.mjs"]
    run = subprocess.run(command, cwd=node_dir, env=env, capture_output=True, text=True, timeout=200, check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 0 and re.search(r"^\S* ?pass 1$", output, re.MULTILINE), output


def test_the_fixed_fuzz_cases_hold_over_https(secure: Stack, certificates: Certificates) -> None:
    """The fuzzer's fixed JSON cases (tests/fuzzing.py) through the HTTPS edge: the same rules as in plaintext."""
    cases = [case for case in fz.fixed_http_cases() if case.raw is None]
    broken = []
    with httpx.Client(verify=certificates.path("ca.pem"), timeout=fz.TIME_BOUND_S) as http:
        for case in cases:
            outcome = fz.send_http(http, f"https://127.0.0.1:{secure.ports.http}", case)
            if outcome.violations:
                broken.append(f"{case.description}: {outcome.violations}")
    assert len(cases) > 50 and not broken, broken


def test_make_run_with_the_readmes_tls_settings(certificates: Certificates, tmp_path: Path) -> None:
    """The README's `make run` line for TLS (its certificate paths the test's): HTTPS at the edge, mutual TLS to
    the replica and on the internal listener, and the printed addresses say so."""
    ports = free_ports()
    env = make_run_env(
        ports,
        CHATWIRE_TLS_CERT_FILE=certificates.path("server.pem"),
        CHATWIRE_TLS_KEY_FILE=certificates.path("server-key.pem"),
        **mutual_env(certificates),
    )
    log_path = tmp_path / "run.log"
    with make_run(env, log_path):
        printed = log_path.read_text()
        assert f"https://127.0.0.1:{ports['HTTP']}/v1/chat/completions" in printed and "mutual TLS)" in printed
        models = httpx.get(
            f"https://127.0.0.1:{ports['HTTP']}/v1/models", verify=certificates.path("ca.pem"), timeout=10
        )
        assert models.status_code == 200
        reply = grpc_call(f"127.0.0.1:{ports['GRPC_EDGE']}", credentials(certificates, "ca.pem", "client"))
        assert reply.choices
