"""Streamed text never shows a broken character or any part of a stop string."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyllm.inference.textstream import TextStream, stream_text
from tinyllm.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


def run(tokenizer, ids, stops=()):
    ts = TextStream(tokenizer, stops)
    pieces = [ts.push(i) for i in ids]
    pieces.append(ts.flush())
    return pieces, ts.stopped


def byte_tokens(tokenizer, text: str) -> list[int]:
    """One token per byte of `text`, to split characters (GPT-2's first 256 ids are the bytes)."""
    by_byte = {tokenizer.decode_bytes([i]): i for i in range(256)}
    return [by_byte[bytes([b])] for b in text.encode()]


def test_characters_split_across_tokens_are_sent_whole(tokenizer):
    ids = byte_tokens(tokenizer, "é☃")
    assert len(ids) == 5  # 2 + 3 bytes
    pieces, _ = run(tokenizer, ids)
    assert pieces == ["", "é", "", "", "☃", ""]


def test_an_unfinished_character_ends_as_a_replacement_char(tokenizer):
    pieces, _ = run(tokenizer, byte_tokens(tokenizer, "a☃")[:-1])
    assert "".join(pieces) == "a\ufffd"


def test_special_ids_are_never_sent_as_text(tokenizer):
    # Generation stops at them; should one reach the stream anyway, it is markup, not text.
    ids = [tokenizer.im_start_id, *tokenizer.encode("Hi"), tokenizer.eot_id, tokenizer.im_end_id,
           tokenizer.pad_id, *tokenizer.encode(" there")]
    pieces, _ = run(tokenizer, ids, ["<|im_end|>"])
    assert "".join(pieces) == "Hi there"


def test_stop_string_spanning_tokens_is_never_sent(tokenizer):
    ids = tokenizer.encode("Hello world, and goodbye")
    pieces, stopped = run(tokenizer, ids, ["d, and"])
    assert stopped
    assert "".join(pieces) == "Hello worl"
    assert all("d, and" not in p and not p.endswith("d") for p in pieces)


def test_held_text_that_turns_out_not_to_be_a_stop_is_released(tokenizer):
    ids = tokenizer.encode("abc abd")
    pieces, stopped = run(tokenizer, ids, ["abx"])
    assert not stopped and "".join(pieces) == "abc abd"


def test_nothing_is_returned_after_a_stop(tokenizer):
    ts = TextStream(tokenizer, ["\n"])
    out = ts.push(tokenizer.encode("x\ny")[0]) + ts.push(tokenizer.encode("\n")[0])
    assert ts.stopped and out == "x"
    assert ts.push(tokenizer.encode("more")[0]) == "" and ts.flush() == ""


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(alphabet="ab \n☃é", max_size=30),
    stop=st.text(alphabet="ab \n☃", min_size=1, max_size=3),
)
def test_streamed_text_is_the_text_before_the_first_stop(tokenizer, text, stop):
    ids = tokenizer.encode(text)
    pieces, stopped = run(tokenizer, ids, [stop])
    expected = text.split(stop, 1)[0]
    assert "".join(pieces) == expected
    assert stopped == (stop in text)


def test_streamed_pieces_never_split_a_character(tokenizer):
    text = "naïve 😀 café → done"
    pieces = list(stream_text(tokenizer, tokenizer.encode(text)))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    pieces = list(stream_text(tokenizer, byte_tokens(tokenizer, "é☃")))
    assert pieces == ["é", "☃"]  # whole characters, no empty pieces


def test_stream_text_prints_no_special_ids(tokenizer):
    ids = [*tokenizer.encode("a é"), tokenizer.im_start_id, *tokenizer.encode("b"), tokenizer.pad_id, tokenizer.eot_id]
    assert "".join(stream_text(tokenizer, ids)) == "a éb"
