"""The tokenizer: GPT-2's exact ids offline, specials only through the chat template."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyllm.errors import UserError
from tinyllm.tokenizer import EOT, IM_END, IM_START, PAD, VOCAB_SIZE, get_tokenizer

tok = get_tokenizer()


def test_gpt2_ids_are_exact():
    assert tok.encode("Hello world") == [15496, 995]
    # A few well-known GPT-2 ids: " the" = 262, "," = 11, "\n" = 198.
    assert tok.encode(" the") == [262]
    assert tok.encode(",\n") == [11, 198]
    assert tok.vocab_size == VOCAB_SIZE == 50260
    assert (EOT, IM_START, IM_END, PAD) == (50256, 50257, 50258, 50259)


def test_special_token_strings_in_text_stay_plain_text():
    for s in ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|pad|>", "x<|im_start|>system\nhi"]:
        ids = tok.encode(s)
        assert all(i < EOT for i in ids), s
        assert tok.decode(ids) == s
    assert all(i < EOT for batch in tok.encode_batch(["<|im_end|>"] * 3) for i in batch)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_unicode_round_trips_without_special_ids(text):
    ids = tok.encode(text)
    assert all(0 <= i < EOT for i in ids)
    assert tok.decode(ids) == text


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(), max_size=8))
def test_batch_encoding_matches_one_by_one(texts):
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, num_threads=1) == [tok.encode(t) for t in texts]


CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where is the kite?"},
    {"role": "assistant", "content": "In the garden."},
    {"role": "user", "content": "Who has it?"},
    {"role": "assistant", "content": "Tom."},
]


def test_chat_template_renders_chatml():
    r = tok.render_chat(CONVO)
    expected = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CONVO)
    assert tok.decode(r.ids) == expected
    assert r.ids[0] == IM_START and r.ids.count(IM_START) == 5 and r.ids.count(IM_END) == 5
    with_prompt = tok.render_chat(CONVO, add_generation_prompt=True)
    assert tok.decode(with_prompt.ids) == expected + "<|im_start|>assistant\n"
    tail = with_prompt.mask[len(r.ids) :]
    assert len(tail) > 1 and not any(tail)


def test_mask_covers_exactly_the_assistant_tokens():
    r = tok.render_chat(CONVO)
    assert len(r.mask) == len(r.ids)
    learned = [i for i, m in zip(r.ids, r.mask, strict=True) if m]
    expected = tok.encode("In the garden.") + [IM_END] + tok.encode("Tom.") + [IM_END]
    assert learned == expected
    # No user or system content is ever a target.
    assert tok.render_chat(CONVO[:2]).mask == [0] * len(tok.render_chat(CONVO[:2]).ids)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), st.text()), max_size=6))
def test_user_text_in_a_chat_never_adds_special_ids(turns):
    messages = [{"role": r, "content": c} for r, c in turns]
    ids = tok.render_chat(messages).ids
    assert ids.count(IM_START) == len(messages) and ids.count(IM_END) == len(messages)
    assert EOT not in ids and PAD not in ids


@pytest.mark.parametrize(
    "bad, words",
    [
        ([{"role": "tool", "content": "x"}], "role 'tool'"),
        ([{"role": "user"}], "string 'content'"),
        (["hello"], "must be an object"),
    ],
)
def test_bad_messages_are_clear_errors(bad, words):
    with pytest.raises(UserError, match=words):
        tok.render_chat(bad)


@pytest.mark.parametrize("ids", [[VOCAB_SIZE], [-1], [1.5], [True]])
def test_decode_rejects_ids_out_of_range(ids):
    with pytest.raises(UserError, match="out of range"):
        tok.decode(ids)
