"""Small pieces that need no server: stop-sequence matching, the spec validator itself, upstream error mapping,
CPU counting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from google.protobuf import json_format

from chatwire_server.text import StopMatcher
from conftest import assert_valid


def feed_all(
    stops: tuple[str, ...], pieces: list[str], repeated_block: tuple[str, str] | None = None
) -> tuple[str, bool]:
    matcher = StopMatcher(stops, repeated_block)
    out = []
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


@pytest.mark.parametrize(
    "stops, pieces, expected",
    [
        (("END",), ["Hello ", "world"], ("Hello world", False)),
        (("END",), ["abc", "END", "more"], ("abc", True)),
        (("END",), ["abcE", "N", "Dxyz"], ("abc", True)),  # spans three pieces
        (("END",), ["abcE", "N", "x"], ("abcENx", False)),  # a false start is released
        (("\n\n", "STOP"), ["one\n", "\ntwo"], ("one", True)),
        (("lo w",), ["hel", "lo", " wor"], ("hel", True)),
        ((), ["a", "b"], ("ab", False)),
        (("ab", "b"), ["xab"], ("x", True)),  # the earliest match wins
    ],
)
def test_stop_matcher(stops: tuple[str, ...], pieces: list[str], expected: tuple[str, bool]) -> None:
    assert feed_all(stops, pieces) == expected


def test_stop_matcher_holds_back_only_possible_prefixes() -> None:
    matcher = StopMatcher(("STOP",))
    assert matcher.feed("go ST") == ("go ", False)
    assert matcher.feed("X") == ("STX", False)


@pytest.mark.parametrize(
    "pieces, expected",
    [
        (["<c>a</c>", "\n<c>a</c>", "\nmore"], ("<c>a</c>\n", True)),  # the repeat is cut, the block stays
        (["<c>a</", "c>\n<c", ">a</c>"], ("<c>a</c>\n", True)),  # pieces split anywhere
        (["<c>a</c>\n<c>", "b</c>"], ("<c>a</c>\n<c>b</c>", False)),  # a different block is no repeat
        (["<c>a</c>\n<c>b</c>\n<c>", "b</c>"], ("<c>a</c>\n<c>b</c>\n", True)),
        (["<c>ab</c>", "<c>a</c>", "x"], ("<c>ab</c><c>a</c>x", False)),  # a prefix of a block is no repeat
    ],
)
def test_stop_matcher_ends_before_a_repeated_block(pieces: list[str], expected: tuple[str, bool]) -> None:
    assert feed_all((), pieces, ("<c>", "</c>")) == expected


def test_stop_matcher_holds_back_a_possible_repeat_only() -> None:
    matcher = StopMatcher((), ("<c>", "</c>"))
    assert matcher.feed("<c>a</c>") == ("<c>a</c>", False)
    assert matcher.feed("\n<c>a") == ("\n", False)  # could be the repeat
    assert matcher.feed("b") == ("<c>ab", False)  # it is not


def test_validator_rejects_what_the_spec_forbids() -> None:
    good = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi", "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
    }
    assert_valid(good, "CreateChatCompletionResponse")
    for broken in (
        {**good, "system_fingerprint": None},
        {**good, "created": "1"},
        {**good, "choices": [{k: v for k, v in good["choices"][0].items() if k != "logprobs"}]},  # type: ignore[union-attr]
    ):
        with pytest.raises(AssertionError):
            assert_valid(broken, "CreateChatCompletionResponse")


def _spec_properties(name: str) -> set[str]:
    """Every property of a spec schema, following allOf/oneOf/anyOf branches."""
    from conftest import SPEC

    def walk(schema: dict[str, object]) -> set[str]:
        if "$ref" in schema:
            return walk(SPEC["definitions"][str(schema["$ref"]).rsplit("/", 1)[-1]])
        found = set(schema.get("properties", {}))  # type: ignore[arg-type]
        for key in ("allOf", "oneOf", "anyOf"):
            for branch in schema.get(key, []):  # type: ignore[attr-defined]
                found |= walk(branch)
        return found

    return walk(SPEC["definitions"][name])


@pytest.mark.parametrize(
    "spec_schema, proto_message",
    [
        ("CreateChatCompletionRequest", "CreateChatCompletionRequest"),
        ("ChatCompletionRequestMessage", "ChatCompletionRequestMessage"),
        ("ChatCompletionRequestUserMessageContentPart", "ChatCompletionRequestMessageContentPart"),
        ("ChatCompletionRequestAssistantMessageContentPart", "ChatCompletionRequestMessageContentPart"),
        ("ChatCompletionTool", "ChatCompletionTool"),
        ("FunctionObject", "FunctionObject"),
        ("ResponseFormatJsonSchema", "ResponseFormat"),
        ("ChatCompletionStreamOptions", "StreamOptions"),
        ("CreateChatCompletionResponse", "CreateChatCompletionResponse"),
        ("CreateChatCompletionStreamResponse", "CreateChatCompletionStreamResponse"),
        ("ChatCompletionResponseMessage", "ChatCompletionResponseMessage"),
        ("ChatCompletionStreamResponseDelta", "ChatCompletionStreamResponseDelta"),
        ("CompletionUsage", "CompletionUsage"),
        ("ChatCompletionTokenLogprob", "ChatCompletionTokenLogprob"),
        ("Error", "Error"),
    ],
)
def test_proto_has_every_spec_property(spec_schema: str, proto_message: str) -> None:
    """Envoy drops unknown JSON keys silently, so a property missing from the proto would be ignored."""
    from chatwire.v1 import chat_completion_pb2, error_pb2

    # Response-only keys the server never sends (nothing to mirror yet) are listed, not silently skipped.
    not_sent = {"metadata", "moderation", "audio"}
    descriptor = getattr(chat_completion_pb2, proto_message, None) or getattr(error_pb2, proto_message)
    fields = set(descriptor.DESCRIPTOR.fields_by_name)
    missing = _spec_properties(spec_schema) - fields
    if spec_schema.startswith(("CreateChatCompletionResponse", "CreateChatCompletionStream", "ChatCompletionResponse")):
        missing -= not_sent
    assert not missing, f"{proto_message} lacks {sorted(missing)}"


def parse_reply(pieces: list[str]) -> list[object]:
    from chatwire_server.structured import ReplyParser

    parser = ReplyParser()
    out: list[object] = []
    for piece in pieces:
        out += parser.feed(piece)
    return out + parser.finish()


def test_reply_parser_streams_calls_and_content() -> None:
    from chatwire_server.structured import ContentPiece, ToolCallArguments, ToolCallStart

    text = 'Sure. <tool_call>{"name": "f", "arguments": {"a": "}\\"x", "b": [1, {"c": 2}]}}</tool_call>'
    for size in (1, 3, 7, len(text)):  # any split of the stream gives the same calls
        pieces = parse_reply([text[i : i + size] for i in range(0, len(text), size)])
        content = "".join(p.text for p in pieces if isinstance(p, ContentPiece))
        starts = [p for p in pieces if isinstance(p, ToolCallStart)]
        arguments = "".join(p.text for p in pieces if isinstance(p, ToolCallArguments))
        assert content == "Sure. "
        assert [s.name for s in starts] == ["f"] and starts[0].id.startswith("call_")
        assert arguments == '{"a": "}\\"x", "b": [1, {"c": 2}]}'


def test_reply_parser_parallel_calls_and_a_cut_tail() -> None:
    from chatwire_server.structured import ContentPiece, ToolCallStart

    call = '<tool_call>{"name": "g", "arguments": {}}</tool_call>'
    pieces = parse_reply([call, "\n", call, "\n<tool_c"])
    assert [p.index for p in pieces if isinstance(p, ToolCallStart)] == [0, 1]
    assert not [p for p in pieces if isinstance(p, ContentPiece)]
    assert parse_reply(["a < b and <tool"]) == [ContentPiece("a < b and "), ContentPiece("<tool")]


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        # OpenAI's own shape (also chatwire's and llama-server's): message, param and code kept.
        (
            400,
            {"error": {"message": "bad", "type": "invalid_request_error", "param": "top_p", "code": "x"}},
            (400, "bad", "top_p", "x"),
        ),
        # vLLM's older flat shape, its HTTP status in `code`: dropped, not a string.
        (
            400,
            {"object": "error", "message": "too long", "type": "BadRequestError", "param": None, "code": 400},
            (400, "too long", None, None),
        ),
        (
            422,
            {"error": "Input validation error", "error_type": "validation"},
            (400, "Input validation error", None, None),
        ),  # TGI
        (429, {"error": {"message": "busy"}}, (429, "busy", None, "rate_limit_exceeded")),
        (401, {"error": {"message": "wrong key sk-..."}}, (502, None, None, "upstream_error")),
        (503, "no healthy upstream", (502, None, None, "upstream_error")),
    ],
)
def test_upstream_errors_mapped(status: int, body: object, expected: tuple[int, str | None, str | None, str]) -> None:
    from chatwire_server.engines.openai_upstream import error_from_upstream

    error = error_from_upstream(status, body, {"retry-after": "7"})
    http = {"INVALID_ARGUMENT": 400, "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 502}[error.status.name]
    message = expected[1] or f"The upstream server failed the request (HTTP {status})."
    assert (http, error.message, error.param, error.code) == (expected[0], message, expected[2], expected[3])
    if status == 429:
        assert ("retry-after", "7") in error.metadata
    assert "sk-" not in error.message  # an upstream's own 4xx/5xx text about its credentials is not shown


def test_relayed_request_is_the_json_the_client_sent() -> None:
    from google.protobuf import json_format

    from chatwire.v1 import chat_completion_pb2 as pb
    from chatwire_server.api.convert import relay_request_from_proto

    body = {
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}],
        "seed": 12345678901,
        "temperature": 0.25,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"maxItems": 3, "x": 1.5}}}],
        "logit_bias": {"5": -100},
    }
    request = json_format.ParseDict(body, pb.CreateChatCompletionRequest())
    assert relay_request_from_proto(request) == body
    # An empty string is still sent: protobuf keeps no trace of it, but servers require `arguments`.
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}
    body["messages"] = [{"role": "assistant", "tool_calls": [call]}]
    request = json_format.ParseDict(body, pb.CreateChatCompletionRequest())
    assert relay_request_from_proto(request)["messages"] == body["messages"]


def test_usable_cpus_follow_the_cgroup_quota(tmp_path: Path) -> None:
    from chatwire_server.cpus import cgroup_cpu_quota, usable_cpus

    # cgroup v2, a container limited to 1.5 CPUs: one engine thread, not one per core of the node.
    (tmp_path / "v2" / "kubepods" / "pod1").mkdir(parents=True)
    (tmp_path / "v2" / "kubepods" / "cpu.max").write_text("max 100000\n")
    (tmp_path / "v2" / "kubepods" / "pod1" / "cpu.max").write_text("150000 100000\n")
    self_v2 = tmp_path / "self-v2"
    self_v2.write_text("0::/kubepods/pod1\n")
    assert cgroup_cpu_quota(tmp_path / "v2", self_v2) == 1.5
    assert usable_cpus(tmp_path / "v2", self_v2) == 1
    # cgroup v1: the limit is on a parent of the process's group, in the cpu controller's hierarchy only.
    (tmp_path / "v1" / "cpu" / "docker" / "c1").mkdir(parents=True)
    (tmp_path / "v1" / "cpu" / "docker" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "v1" / "cpu" / "docker" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "v1" / "cpu" / "docker" / "c1" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "v1" / "cpu" / "docker" / "c1" / "cpu.cfs_period_us").write_text("100000\n")
    self_v1 = tmp_path / "self-v1"
    self_v1.write_text("4:memory:/elsewhere\n2:cpu,cpuacct:/docker/c1\n0::/\n")
    assert cgroup_cpu_quota(tmp_path / "v1", self_v1) == 3.0
    # No limit anywhere: the affinity mask decides.
    self_v2.write_text("0::/\n")
    assert cgroup_cpu_quota(tmp_path / "v2", self_v2) is None
    assert usable_cpus(tmp_path / "v2", self_v2) == len(os.sched_getaffinity(0))


def test_relayed_replies_where_servers_stray() -> None:
    from chatwire_server.api.relayed import relayed_chunk_to_proto, relayed_response_to_proto

    reply = {
        "id": 17,
        "object": "chat.completion",
        "created": 1795850073123,  # milliseconds
        "model": "upstream-name",
        "choices": [
            {
                "index": 0.0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": {"id": "c", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}},
                    "reasoning_content": "vendor extension",
                },
                "finish_reason": "tool_calls",
                "logprobs": {"content": [{"token": "a", "logprob": float("-inf"), "bytes": [97], "top_logprobs": []}]},
            }
        ],
        "usage": {"prompt_tokens": 3.0, "completion_tokens": 2, "total_tokens": 5, "prompt_tokens_details": None},
    }
    response = relayed_response_to_proto(reply, "ours")
    assert (response.id, response.created, response.model) == ("17", 1795850073, "ours")
    call = response.choices[0].message.tool_calls[0]
    assert call.function.arguments == '{"a": 1}' and response.usage.prompt_tokens == 3
    assert response.choices[0].logprobs.struct_value["content"][0]["logprob"] == -9999.0
    chunk = relayed_chunk_to_proto({"id": "x", "choices": [{"index": 0, "delta": {"content": "hi"}}]}, "ours")
    assert chunk.choices[0].finish_reason.WhichOneof("kind") == "null_value"  # OpenAI requires the key


def test_relayed_logprobs_hold_the_specs_keys_only() -> None:
    """llama-server's logprobs, as it sends them: every token and alternative carries its `id`, and `refusal` is
    missing; the spec's `ChoiceLogprobs` has neither."""
    from chatwire_server.api.relayed import relayed_response_to_proto

    hello = {"id": 19556, "token": "Hello", "bytes": [72, 101, 108, 108, 111], "logprob": -1.1}
    reply = {
        "id": "chatcmpl-x",
        "created": 1796525749,
        "choices": [
            {
                "index": 0,
                "finish_reason": "length",
                "message": {"role": "assistant", "content": "Hello"},
                "logprobs": {"content": [{**hello, "top_logprobs": [hello, {**hello, "id": 6004, "token": "hi"}]}]},
            }
        ],
    }
    choice = json_format.MessageToDict(relayed_response_to_proto(reply, "ours"), preserving_proto_field_name=True)
    logprobs = choice["choices"][0]["logprobs"]
    assert logprobs["refusal"] is None
    (token,) = logprobs["content"]
    assert set(token) == {"token", "logprob", "bytes", "top_logprobs"} and token["bytes"] == hello["bytes"]
    assert [set(top) for top in token["top_logprobs"]] == [{"token", "logprob", "bytes"}] * 2
    assert [top["token"] for top in token["top_logprobs"]] == ["Hello", "hi"]


def test_upstream_stream_events() -> None:
    import asyncio

    import httpx

    from chatwire_server.engines.openai_upstream import _event_chunk, _sse_data, error_from_upstream
    from chatwire_server.errors import ChatwireError

    # U+2028 inside a JSON string is not a line end (str.splitlines() says it is); CRLF split across reads is.
    pieces = [b'data: {"a": "x\xe2\x80\xa8y"}\r', b"\n\r\ndata: 1\r\ndata: 2\r\n\r", b"\ndata: [DONE]\n\n"]

    class Pieces(httpx.AsyncByteStream):
        async def __aiter__(self):  # type: ignore[no-untyped-def]
            for piece in pieces:
                yield piece

    async def events() -> list[str]:
        return [data async for data in _sse_data(httpx.Response(200, stream=Pieces()))]

    assert asyncio.run(events()) == ['{"a": "x\u2028y"}', "1\n2", "[DONE]"]
    # Error events: OpenAI's shape, vLLM's (its status in `code`), and vLLM's older flat one.
    for event, status in (
        ('{"error": {"message": "m", "type": "invalid_request_error"}}', "INVALID_ARGUMENT"),
        ('{"error": {"message": "m", "type": "BadRequestError", "code": 400}}', "INVALID_ARGUMENT"),
        ('{"object": "error", "message": "m", "type": "ServiceUnavailableError", "code": 503}', "UNAVAILABLE"),
    ):
        with pytest.raises(ChatwireError) as caught:
            _event_chunk(event)
        assert caught.value.status.name == status
    assert error_from_upstream(424, {"error": "generation failed"}, {}).metadata == [("x-chatwire-http-status", "502")]
    assert error_from_upstream(408, "", {}).metadata == [("x-chatwire-http-status", "504")]


def test_thread_tuner_follows_the_faster_count() -> None:
    from chatwire_server.engines.threads import ThreadTuner

    tuner = ThreadTuner(2, probe_steps=4, first_probe_after=8, longest_wait=64)

    def run(steps: int, ms: dict[int, float], batch: int = 1) -> list[int]:
        used = []
        for _ in range(steps):
            threads = tuner.threads_for(batch)
            used.append(threads)
            tuner.record(batch, ms[threads] / 1000)
        return used

    quiet, noisy = {2: 12.0, 1: 20.0}, {2: 60.0, 1: 24.0}
    used = run(200, quiet)
    assert tuner.threads == 2 and used.count(1) < 0.1 * len(used)  # probes only, fewer as they keep losing
    # A probe that is clearly slower from its first two steps stops there.
    assert "1" in "".join(map(str, used)) and "111" not in "".join(map(str, used))
    run(100, noisy)  # a neighbour takes a core: one thread is faster
    assert tuner.threads == 1
    run(300, quiet)  # it left: back to both
    assert tuner.threads == 2
    # Steps with a prompt in them are not compared, and a new batch size starts its measurements over.
    assert tuner.threads_for(None) == 2
    tuner.record(None, 5.0)
    assert tuner.threads == 2

    # Probes that keep losing grow rare, but a batch size that got much slower than it was is probed soon:
    # one stream quiet, then 16 streams quiet for long, then one stream beside a busy neighbour.
    tuner = ThreadTuner(2, probe_steps=4, first_probe_after=8, longest_wait=4096)
    run(100, quiet)
    run(2000, {2: 100.0, 1: 180.0}, batch=16)
    run(100, noisy)
    assert tuner.threads == 1

    # A long noisy spell makes probes rare, but below every usable CPU a probe up still comes within 3 s of
    # decoding: when the neighbour leaves, one stream is back on both threads in seconds, not thousands of steps.
    tuner = ThreadTuner(2, probe_steps=4, first_probe_after=8, longest_wait=4096)
    probes_in_noise = run(3000, noisy).count(2)
    assert tuner.threads == 1 and probes_in_noise < 0.02 * 3000  # each up-probe stops after its first slow step
    used = run(300, quiet)  # 20 ms steps on one thread: 3 s is 150 of them
    assert tuner.threads == 2 and used.index(2) <= 160


@pytest.mark.parametrize("inputs", ['["image"]', '["text", "video"]', '"text"', '["text", {x = 1}]'])
def test_a_models_input_kinds_are_checked_at_start(tmp_path: Path, inputs: str) -> None:
    from chatwire_server.registry import ModelRegistry

    config = tmp_path / "models.toml"
    config.write_text(f'[[models]]\nid = "m"\nengine = "openai"\ninput = {inputs}\n[models.settings]\nbase_urls = []\n')
    with pytest.raises(ValueError, match="`input` must list `text`"):
        ModelRegistry.from_config(config)


def test_local_engines_read_text_only(tmp_path: Path) -> None:
    from chatwire_server.registry import ModelRegistry

    config = tmp_path / "models.toml"
    config.write_text('[[models]]\nid = "m"\nengine = "scripted"\ninput = ["text", "image"]\n')
    with pytest.raises(ValueError, match="reads text only"):
        ModelRegistry.from_config(config)


def test_batch_invariance_refuses_a_llama_cpp_without_the_patch(monkeypatch: pytest.MonkeyPatch) -> None:
    from chatwire_server.engines import llama_cpp as engine

    # A real library of the same build that lacks the kernel's marker, as a stock llama-cpp-python's ggml-cpu would.
    monkeypatch.setattr(engine, "GGML_CPU_LIBRARY", engine.GGML_CPU_LIBRARY.with_name("libggml-base.so"))
    monkeypatch.setattr(engine, "_process_batch_invariant", None)
    monkeypatch.setenv(engine.BATCH_INVARIANT_ENV, "")
    with pytest.raises(ValueError, match="chatwire's patch"):
        engine.set_batch_invariant_attention(True)
    engine.set_batch_invariant_attention(False)  # off needs nothing from the build
    assert os.environ[engine.BATCH_INVARIANT_ENV] == "0"


def test_models_in_one_process_must_agree_on_batch_invariance(monkeypatch: pytest.MonkeyPatch) -> None:
    from chatwire_server.engines import llama_cpp as engine

    monkeypatch.setattr(engine, "_process_batch_invariant", None)
    monkeypatch.setenv(engine.BATCH_INVARIANT_ENV, "")
    engine.set_batch_invariant_attention(True)  # make's build has the kernel
    assert os.environ[engine.BATCH_INVARIANT_ENV] == "1"
    engine.set_batch_invariant_attention(True)
    with pytest.raises(ValueError, match="alike"):
        engine.set_batch_invariant_attention(False)
    assert engine.EngineSettings().batch_invariant
    assert not engine.EngineSettings.from_settings({"batch_invariant": False}).batch_invariant


def test_prediction_alignment_counts_each_predicted_token_once() -> None:
    from chatwire_server.engines.speculation import PredictionAligner

    def counts(predicted: list[int], reply: list[int]) -> tuple[int, int]:
        aligner = PredictionAligner(predicted)
        for token in reply:
            aligner.feed(token)
        return aligner.accepted, aligner.rejected

    assert counts([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]) == (5, 0)
    assert counts([1, 2, 3, 4, 5], [1, 2, 3]) == (3, 2)  # cut short (max_tokens)
    # A rename: the reply leaves the prediction at 3 and rejoins after it, realigned on the token they share.
    assert counts([1, 2, 3, 9, 4, 5], [1, 2, 7, 9, 4, 5]) == (5, 1)
    # Repeating a predicted passage uses its tokens once.
    assert counts([1, 2, 3], [1, 2, 3, 1, 2, 3]) == (3, 0)
    assert counts([], [1, 2]) == (0, 0)
    assert counts([1, 2], [7, 8, 9]) == (0, 2)


def test_prediction_drafts_follow_the_reply_and_realign() -> None:
    from chatwire_server.engines.speculation import PredictionAligner

    aligner = PredictionAligner([10, 11, 12, 13, 14, 15, 11, 16, 17, 18])
    assert aligner.draft(3) == [10, 11, 12]
    for token in (10, 11, 99):  # diverges where 12 was predicted
        aligner.feed(token)
    assert aligner.draft(4) == []  # 99 is nowhere in the prediction
    aligner.feed(13)  # rejoins on one token: too weak a guess to draft from yet
    assert aligner.draft(2) == []
    aligner.feed(14)  # two in a row: what follows comes next
    assert aligner.draft(2) == [15, 11]
    aligner.feed(50)
    aligner.feed(11)  # 11 occurs twice: the one after where the reply left the prediction wins
    aligner.feed(16)
    assert aligner.draft(2) == [17, 18]


def test_prompt_lookup_drafts_what_followed_the_last_tokens() -> None:
    from chatwire_server.engines.speculation import PromptIndex, PromptLookup

    lookup = PromptLookup(PromptIndex([5, 1, 2, 3, 4, 6, 7]))
    assert lookup.draft(4) == []
    lookup.feed(1)
    lookup.feed(2)
    assert lookup.draft(3) == [3, 4, 6]  # "1 2" is in the prompt
    for token in (3, 8, 1, 2):
        lookup.feed(token)
    assert lookup.draft(2) == [3, 8]  # the reply's own "1 2" is the latest occurrence


def test_draft_lengths_pay_for_their_rows() -> None:
    from chatwire_server.engines.speculation import MAX_DRAFT, StepCost, plan_draft_lengths

    cost = StepCost(fixed=0.006, per_row=0.004)
    # A lone stream with a reliable draft verifies many tokens; with a poor one, none.
    assert 8 <= plan_draft_lengths(1, 1, [(0.99, 100)], cost, 512)[0] <= MAX_DRAFT
    assert 3 <= plan_draft_lengths(1, 1, [(0.9, 100)], cost, 512)[0] < 8
    assert plan_draft_lengths(1, 1, [(0.2, 100)], cost, 512) == [0]
    # Never more than the draft holds, nor past the batch.
    assert plan_draft_lengths(1, 1, [(0.99, 3)], cost, 512) == [3]
    assert sum(plan_draft_lengths(1, 1, [(0.99, 100), (0.99, 100)], cost, 6)) == 5
    # A full batch (its rows keep the CPU busy already) takes only near-certain drafts, and fewer of them.
    alone = plan_draft_lengths(1, 1, [(0.8, 100)], cost, 512)[0]
    assert plan_draft_lengths(64, 64, [(0.8, 100)], cost, 512) == [0] and alone > 0
    assert plan_draft_lengths(64, 64, [(0.995, 100)], cost, 512)[0] > 0


def test_schema_properties_keep_the_required_order_whatever_the_struct_gave() -> None:
    from chatwire_server import structured

    schema = {
        "type": "object",
        "properties": {"c": {"type": "string"}, "a": {"type": "string"}, "b": {"type": "string"}, "z": {}},
        "required": ["b", "c", "a"],
    }
    prepared = structured._prepared(schema)
    assert list(prepared["properties"]) == ["b", "c", "a", "z"]
    shuffled = {**schema, "properties": dict(reversed(list(schema["properties"].items())))}
    assert structured._compiled(shuffled, "p") == structured._compiled(schema, "p")
