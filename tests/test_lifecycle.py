"""Server lifecycle: SIGTERM drains in-flight streams, then the process exits cleanly."""

from __future__ import annotations

import signal
import subprocess
import tempfile
import threading
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import json_format

from chatwire.v1 import chat_completion_pb2 as pb
from chatwire.v1 import chat_service_pb2_grpc
from chatwire_server.edge import stack
from conftest import MODEL, engine_workers, free_ports, make_run, make_run_env, run_stack


def test_sigterm_lets_a_running_stream_finish_then_exits() -> None:
    port = stack.free_port()
    log_path = Path(tempfile.mkdtemp(prefix="chatwire-sigterm-")) / "server.log"
    with log_path.open("wb") as log:
        server = stack.start_server(port, log)
        try:
            stack.wait_for_server(port, server)
            request = json_format.ParseDict(
                {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "Count from 1 to 100."}],
                    "max_tokens": 48,
                    "temperature": 0,
                },
                pb.CreateChatCompletionRequest(),
            )
            finishes: list[str] = []
            first_chunk = threading.Event()

            def consume() -> None:
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                    stub = chat_service_pb2_grpc.ChatServiceStub(channel)
                    for chunk in stub.StreamChatCompletion(request, timeout=60):
                        first_chunk.set()
                        finishes.extend(
                            c.finish_reason.string_value for c in chunk.choices if c.finish_reason.string_value
                        )

            reader = threading.Thread(target=consume)
            reader.start()
            assert first_chunk.wait(30)
            server.send_signal(signal.SIGTERM)
            reader.join(60)
            assert finishes == ["length"], "the in-flight stream was cut by shutdown"
            assert server.wait(30) == 0
        finally:
            stack.stop(server)
    records = log_path.read_text()
    assert '"msg": "shutting down"' in records and '"msg": "stopped"' in records


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ('engine = "no-such-engine"', b"no-such-engine"),
        # Loaded in the engine worker, whose failure the server reports as its own.
        ('engine = "llama_cpp"\nsettings = { model_path = "/nowhere/model.gguf" }', b"/nowhere/model.gguf"),
    ],
    ids=["unknown-engine", "missing-model-file"],
)
def test_server_refuses_to_start_with_a_broken_config(tmp_path: Path, entry: str, named: bytes) -> None:
    config = tmp_path / "models.toml"
    config.write_text(f'[[models]]\nid = "x"\n{entry}\n')
    result = subprocess.run(
        stack.server_command(stack.free_port(), config), env=stack.python_env(), capture_output=True, timeout=60
    )
    assert result.returncode == 2
    assert b'"msg": "cannot start"' in result.stderr and named in result.stderr


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_make_run_launcher_serves_then_stops_both_processes(tmp_path: Path, stop_signal: signal.Signals) -> None:
    """`make run` is `python -m chatwire_server.edge.stack`: it serves on the configured ports and cleans up."""
    ports = free_ports()
    log_path = tmp_path / "run.log"
    with make_run(make_run_env(ports), log_path, timeout=60) as launcher:
        reply = httpx.get(f"http://127.0.0.1:{ports['HTTP']}/v1/models", timeout=10)
        assert reply.status_code == 200 and reply.json()["data"][0]["id"] == MODEL
        launcher.send_signal(stop_signal)
        launcher.wait(30)
    output = log_path.read_text()
    assert '"msg": "stopped"' in output  # the gRPC server drained and exited
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{ports['HTTP']}/v1/models", timeout=5)  # and Envoy is gone


def test_in_process_engine_serves_without_a_worker(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """`in_process = true`: the engine runs inside the server, no worker process, same answers at the edge."""
    config = tmp_path / "models.toml"
    config.write_text(stack.DEFAULT_CONFIG.read_text().replace("# in_process = false", "in_process = true"))
    assert "\nin_process = true" in config.read_text()
    with run_stack(request, config) as running:
        assert engine_workers(running.server_pid) == []
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        reply = httpx.post(f"{running.base_url}/chat/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] >= 1
