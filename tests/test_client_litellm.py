"""LiteLLM (its `openai/` provider) against the real stack: the requests LiteLLM sends, through the real Envoy
edge to the real model, and the exceptions it makes of our errors.

LiteLLM is imported by the `litellm` fixture rather than at the top: the import takes seconds, and collecting
the suite (or running it with `-m "not clients"`) should not pay for it. It must work offline: its model cost
map and tokenizers come from the package, and a guard fails any test during which it looked up or connected
to a host other than the loopback."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any, Literal

import jsonschema
import openai
import pydantic
import pytest

from conftest import MODEL, Stack
from test_structured import ASK_WEATHER, TOOLS, WEATHER

pytestmark = [
    pytest.mark.clients,
    # LiteLLM's own types and code, not ours: TypedDicts with ReadOnly items, a deprecated pydantic accessor.
    pytest.mark.filterwarnings("ignore:.*`ReadOnly` qualifier:UserWarning"),
    pytest.mark.filterwarnings("ignore:Accessing the 'model_:pydantic.warnings.PydanticDeprecatedSince211"),
]

HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]
# --- offline guard -------------------------------------------------------------------------------------

_LOOPBACK = {"127.0.0.1", "::1", "localhost"}
_outside: list[str] = []
_guarding = False


def _record_outside(event: str, args: tuple[Any, ...]) -> None:
    """An audit hook: while guarding, note each name lookup or connection for a host other than the loopback."""
    if not _guarding or event not in ("socket.getaddrinfo", "socket.connect"):
        return
    if event == "socket.getaddrinfo":
        host = args[0]
    else:
        host = args[1][0] if isinstance(args[1], tuple) else None  # AF_UNIX sockets have a path, not a host
    if isinstance(host, bytes):
        host = host.decode()
    if host is not None and host not in _LOOPBACK:
        _outside.append(f"{event} {host}")


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """This thread's event loop while LiteLLM runs, closed afterwards: LiteLLM's blocking calls run its service
    hooks on asyncio.get_event_loop(), which would otherwise leave behind a loop that nobody closes."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    asyncio.set_event_loop(None)
    loop.close()


@pytest.fixture(scope="module")
def litellm(loop: asyncio.AbstractEventLoop) -> Iterator[ModuleType]:
    """LiteLLM, imported offline; the HTTP clients it cached closed afterwards."""
    global _guarding
    with pytest.MonkeyPatch.context() as env:
        # The bundled model cost map instead of one fetched from GitHub, and no other fetches.
        env.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        env.setenv("LITELLM_OFFLINE_MODE", "true")
        env.delenv("TIKTOKEN_CACHE_DIR", raising=False)  # LiteLLM points it at its bundled encodings; undone after
        sys.addaudithook(_record_outside)  # hooks cannot be removed; this one is idle unless _guarding
        _guarding = True
        try:
            import litellm as module
        finally:
            _guarding = False
        module.suppress_debug_info = True  # no "Give Feedback / Get Help" banner with every exception
        yield module
        for client in list(module.in_memory_llm_clients_cache.cache_dict.values()):
            if isinstance(client, openai.OpenAI):
                client.close()
        loop.run_until_complete(module.close_litellm_async_clients())


@pytest.fixture(autouse=True)
def offline(litellm: ModuleType) -> Iterator[None]:
    """Fail the test if LiteLLM (at import or during the test) looked up or connected to another host."""
    global _guarding
    _guarding = True
    try:
        yield
    finally:
        _guarding = False
    found, _outside[:] = list(_outside), []
    assert not found, f"LiteLLM reached beyond this machine: {found}"


def options(chatwire: Stack, **params: Any) -> dict[str, Any]:
    """Arguments for litellm.completion/acompletion against the stack, without retries."""
    return {
        "model": f"openai/{MODEL}",
        "api_base": chatwire.base_url,
        "api_key": "unused",
        "max_retries": 0,
        "timeout": 120,
        **params,
    }


def test_completion_returns_text_and_usage(litellm: ModuleType, chatwire: Stack) -> None:
    reply = litellm.completion(**options(chatwire, messages=HELLO, max_tokens=24))
    assert isinstance(reply, litellm.ModelResponse)
    assert reply.id.startswith("chatcmpl-")
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert not choice.message.tool_calls
    assert choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_stream_joins_text_and_ends_with_the_servers_usage(litellm: ModuleType, chatwire: Stack) -> None:
    unary = litellm.completion(**options(chatwire, messages=HELLO, max_tokens=1))
    stream = litellm.completion(
        **options(chatwire, messages=HELLO, max_tokens=16, stream=True, stream_options={"include_usage": True})
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text.strip()
    reasons = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert len(reasons) == 1 and reasons[0] in ("stop", "length")
    usage = getattr(chunks[-1], "usage", None)
    assert usage is not None, "the last chunk carries the usage"
    # LiteLLM estimates usage with its own tokenizer when a stream has none: the same prompt count as the
    # unary reply shows that this one is the server's.
    assert usage.prompt_tokens == unary.usage.prompt_tokens
    assert 0 < usage.completion_tokens <= 16
    rebuilt = litellm.stream_chunk_builder(chunks, messages=HELLO)
    assert rebuilt.choices[0].message.content == text
    assert rebuilt.usage.completion_tokens == usage.completion_tokens


def test_acompletion_runs_concurrently(litellm: ModuleType, chatwire: Stack, loop: asyncio.AbstractEventLoop) -> None:
    prompts = ["Name a colour.", "Name a fruit.", "Name an animal."]
    calls = [
        litellm.acompletion(**options(chatwire, messages=[{"role": "user", "content": p}], max_tokens=12))
        for p in prompts
    ]
    replies = loop.run_until_complete(asyncio.gather(*calls))
    assert len(replies) == 3 and len({reply.id for reply in replies}) == 3
    for reply in replies:
        assert reply.choices[0].message.content.strip()
        assert reply.usage.completion_tokens > 0


class Basket(pydantic.BaseModel):
    fruit: Literal["apple", "pear", "plum"]
    count: int = pydantic.Field(ge=1, le=5)
    label: str = pydantic.Field(max_length=20)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pydantic_response_format_keeps_bounds(litellm: ModuleType, chatwire: Stack, seed: int) -> None:
    # temperature 1 samples freely: only the server's constrained decoding keeps `count` within 1..5.
    reply = litellm.completion(
        **options(
            chatwire,
            messages=[{"role": "user", "content": "Describe a basket of fruit."}],
            response_format=Basket,
            temperature=1,
            seed=seed,
            max_tokens=80,
        )
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice
    basket = Basket.model_validate_json(choice.message.content)
    assert 1 <= basket.count <= 5 and len(basket.label) <= 20


def test_named_tool_choice_makes_exactly_one_call(litellm: ModuleType, chatwire: Stack) -> None:
    for seed in (1, 2):
        reply = litellm.completion(
            **options(
                chatwire,
                messages=ASK_WEATHER,
                tools=TOOLS,
                tool_choice={"type": "function", "function": {"name": "get_weather"}},
                seed=seed,
                max_tokens=120,
            )
        )
        calls = reply.choices[0].message.tool_calls or []
        assert len(calls) == 1, f"seed {seed}: {calls}"
        assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
        jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER)


def test_unknown_model_is_not_found(litellm: ModuleType, chatwire: Stack) -> None:
    with pytest.raises(litellm.NotFoundError) as caught:
        litellm.completion(**options(chatwire, model="openai/no-such-model", messages=HELLO, max_tokens=4))
    assert caught.value.status_code == 404
    assert "The model `no-such-model` does not exist" in caught.value.message
    # LiteLLM keeps no code or param on a NotFoundError; the reply it wraps has our OpenAI-shaped body.
    error = caught.value.response.json()["error"]
    assert (error["code"], error["param"], error["type"]) == ("model_not_found", "model", "invalid_request_error")


@pytest.mark.parametrize("param, value", [("temperature", 5), ("n", 0)])
def test_invalid_parameter_is_bad_request(litellm: ModuleType, chatwire: Stack, param: str, value: int) -> None:
    with pytest.raises(litellm.BadRequestError) as caught:
        litellm.completion(**options(chatwire, messages=HELLO, max_tokens=4, **{param: value}))
    assert caught.value.status_code == 400
    assert (caught.value.code, caught.value.param) == ("invalid_value", param)
    assert f"Invalid '{param}': {value}" in caught.value.message
