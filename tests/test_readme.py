"""The README's examples, run as written against the live stack (only the ports are swapped)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chatwire_server.edge import stack
from conftest import Stack, assert_valid, parse_sse

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)
# The TLS section's examples run against a stack with TLS on (tests/test_tls.py).
CURL = [body for lang, body in BLOCKS if lang == "sh" and body.startswith("curl") and "https://" not in body]
PYTHON = [body for lang, body in BLOCKS if lang == "python" and "https://" not in body]
TLS_EXAMPLES = [body for lang, body in BLOCKS if lang in ("sh", "python") and "https://127.0.0.1:8080" in body]


def on_test_ports(text: str, chatwire: Stack) -> str:
    text = text.replace("127.0.0.1:8080", f"127.0.0.1:{chatwire.ports.http}")
    return text.replace("127.0.0.1:50051", chatwire.grpc_target).replace("127.0.0.1:50050", chatwire.grpc_edge_target)


def test_readme_has_examples() -> None:
    assert len(CURL) == 3 and len(PYTHON) == 5


@pytest.mark.parametrize("example", CURL, ids=lambda body: body.split("\n")[0][:60])
def test_curl_examples(chatwire: Stack, example: str) -> None:
    result = subprocess.run(
        ["bash", "-c", on_test_ports(example, chatwire)], capture_output=True, text=True, timeout=120, check=True
    )
    if '"stream": true' in example:
        events = parse_sse(result.stdout)
        assert events[-1] == "[DONE]"
        for chunk in events[:-1]:
            assert_valid(chunk, "CreateChatCompletionStreamResponse")
    elif "/models" in example:
        assert json.loads(result.stdout)["data"]
    else:
        assert_valid(json.loads(result.stdout), "CreateChatCompletionResponse")


@pytest.mark.parametrize(
    "example", PYTHON, ids=["openai-sdk", "same-seed-same-reply", "predicted-outputs", "grpc-stub", "grpc-edge-helper"]
)
def test_python_examples(chatwire: Stack, example: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", on_test_ports(example, chatwire)],
        capture_output=True,
        text=True,
        timeout=120,
        env=stack.python_env(),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    if "chatwire_client" in example:  # through the edge's gRPC listener: the reply, and the replica that served it
        assert result.stdout.strip().endswith(chatwire.replicas[0].name), result.stdout
    elif "grpc" in example:
        assert "StatusCode.NOT_FOUND MODEL_NOT_FOUND" in result.stdout and '"model_not_found"' in result.stdout
