"""Small pieces that need no server: stop-sequence matching and the spec validator itself."""

from __future__ import annotations

import pytest

from chatwire_server.text import StopMatcher
from conftest import assert_valid


def feed_all(stops: tuple[str, ...], pieces: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
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
