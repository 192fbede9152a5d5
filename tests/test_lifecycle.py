"""Server lifecycle: SIGTERM drains in-flight streams, then the process exits cleanly."""

from __future__ import annotations

import signal
import subprocess
import tempfile
import threading
from pathlib import Path

import grpc
from google.protobuf import json_format

from chatwire.v1 import chat_completion_pb2 as pb
from chatwire.v1 import chat_service_pb2_grpc
from chatwire_server import stack
from conftest import MODEL


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


def test_server_refuses_to_start_with_a_broken_config(tmp_path: Path) -> None:
    config = tmp_path / "models.toml"
    config.write_text('[[models]]\nid = "x"\nengine = "no-such-engine"\n')
    result = subprocess.run(
        stack.server_command(stack.free_port(), config), env=stack.python_env(), capture_output=True, timeout=60
    )
    assert result.returncode != 0
    assert b"no-such-engine" in result.stderr
