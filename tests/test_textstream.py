"""The text layer over token ids, without a model: incremental decoding and stop strings."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.textstream import IncrementalDecoder, TextStream, holdback

TEXTS = [
    "Hello! How are you today? I am fine, thank you.",
    "Café, naïve, façade — déjà vu 😀 and 日本語 are split over several byte-level tokens.",
    "Line one\nLine two\n\n  indented  and   spaced\ttabs",
]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_join_to_the_decoded_text_and_never_end_in_half_a_character(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) // 4  # byte-level: multi-byte characters span tokens
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push([token]) for token in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any(p.endswith("\ufffd") for p in pieces)


def test_a_character_split_over_tokens_waits_for_its_last_token(tokenizer) -> None:
    ids = tokenizer("😀", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    decoder = IncrementalDecoder(tokenizer)
    assert [decoder.push([t]) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.push(ids[-1:]) == "😀"


def test_an_unfinished_character_is_flushed_at_the_end(tokenizer) -> None:
    ids = tokenizer("ok 😀", add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(tokenizer)
    shown = "".join(decoder.push([t]) for t in ids[:-1])
    assert shown == "ok "
    assert decoder.flush() == "\ufffd"  # what the tokenizer makes of the broken bytes, shown once at the end


def test_special_tokens_are_not_shown(tokenizer) -> None:
    ids = tokenizer("Hello", add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|end|>")]
    decoder = IncrementalDecoder(tokenizer)
    assert "".join(decoder.push([t]) for t in ids) + decoder.flush() == "Hello"


def test_holdback_keeps_a_possible_stop_string_start() -> None:
    assert holdback("Hello\nUs", ["\nUser:"]) == 3
    assert holdback("Hello", ["\nUser:"]) == 0
    assert holdback("Hello\n", ["\nUser:", "\nAssistant:"]) == 1
    assert holdback("abc", []) == 0


def stream_all(tokenizer, text: str, stops: list[str]) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stops)
    pieces = []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        pieces.append(stream.push([token]))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    return pieces, stream


def test_stop_string_cuts_the_text_and_its_start_is_never_shown(tokenizer) -> None:
    text = "I am fine.\nUser: what next?\nAssistant: more"
    pieces, stream = stream_all(tokenizer, text, ["\nUser:"])
    assert stream.stopped and "".join(pieces) == "I am fine."
    shown = ""
    for piece in pieces:  # no prefix of what was shown ever ran into the stop string
        shown += piece
        assert "\n" not in shown


def test_a_stop_string_prefix_that_does_not_complete_is_released(tokenizer) -> None:
    text = "Users say\nUse the force"
    pieces, stream = stream_all(tokenizer, text, ["\nUser:"])
    assert not stream.stopped and "".join(pieces) == text


def test_earliest_of_several_stop_strings_wins(tokenizer) -> None:
    pieces, stream = stream_all(tokenizer, "one two three four", ["four", "two"])
    assert stream.stopped and "".join(pieces) == "one "
