"""Document -> ids and mask, and ids -> Document: the mask is the template's, the inverse is exact."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyllm.data.document import Document, document_from_ids, document_tokens, tokenize_document
from tinyllm.tokenizer import EOT, IM_START, get_tokenizer

CHAT = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who has the kite?"},
    {"role": "assistant", "content": "Tom."},
    {"role": "user", "content": "And\nthe ball?"},
    {"role": "assistant", "content": "Mia has\nit."},
)


def test_mask_marks_only_the_templates_assistant_tokens():
    tok = get_tokenizer()
    doc = Document(text="Mia gave the kite to Tom.", messages=CHAT)
    ids, mask = document_tokens(tok, doc)
    text_ids, chat = tok.encode(doc.text), tok.render_chat(CHAT)
    assert ids == text_ids + chat.ids + [EOT] == tokenize_document(tok, doc)
    assert mask == [0] * len(text_ids) + chat.mask + [0]
    marked = tok.decode(i for i, m in zip(ids, mask, strict=True) if m)
    assert marked == "Tom.<|im_end|>Mia has\nit.<|im_end|>"


def test_plain_text_has_no_assistant_tokens():
    ids, mask = document_tokens(get_tokenizer(), Document(text="Just a story."))
    assert len(mask) == len(ids) and not any(mask)


@pytest.mark.parametrize("doc", [
    Document(text="Only text, with <|im_start|> typed as text."),
    Document(messages=CHAT),
    Document(text="A story.\n", messages=CHAT),
    Document(text="Empty answer:", messages=({"role": "user", "content": "?"}, {"role": "assistant", "content": ""})),
])
def test_ids_read_back_to_the_document(doc):
    tok = get_tokenizer()
    back = document_from_ids(tok, tokenize_document(tok, doc))
    assert back.text == doc.text and (back.messages or None) == (doc.messages or None)


@settings(max_examples=30, deadline=None)
@given(text=st.text(max_size=40), turns=st.lists(st.tuples(st.sampled_from(["user", "assistant", "system"]),
                                                            st.text(max_size=20)), max_size=4))
def test_any_document_round_trips(text, turns):
    tok = get_tokenizer()
    doc = Document(text=text, messages=tuple({"role": r, "content": c} for r, c in turns) or None)
    assert document_from_ids(tok, tokenize_document(tok, doc)).rendered() == doc.rendered()


@pytest.mark.parametrize("ids, message", [
    ([10, 11], "end with <|endoftext|>"),
    ([10, IM_START, 10, EOT], "not ChatML messages"),
])
def test_ids_that_no_document_renders_to_are_refused(ids, message):
    with pytest.raises(ValueError, match=message):
        document_from_ids(get_tokenizer(), ids)


def test_unknown_role_is_refused():
    tok = get_tokenizer()
    ids = [IM_START, *tok.encode("robot\nbeep"), *tok.render_chat(CHAT[:1]).ids[-2:], EOT]
    with pytest.raises(ValueError, match="not ChatML messages"):
        document_from_ids(tok, ids)
