"""A chat session keeps its history inside the context, drops the oldest turns first and keeps the
system message, streams exactly the answer it records, and keeps a stopped answer."""

from __future__ import annotations

import pytest
import torch

from tinyllm.errors import UserError
from tinyllm.inference.chat import STOP_IDS, ChatSession, fit_history, prompt_ids
from tinyllm.inference.sampling import generate
from tinyllm.model.gpt import GPT, GPTConfig
from tinyllm.tokenizer import EOT, SPECIAL_TOKENS, get_tokenizer

SYSTEM = {"role": "system", "content": "You answer questions about stories."}


def conversation(turns: int) -> list[dict]:
    """system, then `turns` numbered user/assistant pairs, then a final question."""
    msgs = [SYSTEM]
    for i in range(turns):
        msgs += [{"role": "user", "content": f"Question number {i}: who has the kite?"},
                 {"role": "assistant", "content": f"Answer number {i}: Tom has the kite."}]
    return msgs + [{"role": "user", "content": "And the last question?"}]


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=96)).eval()


def test_long_conversation_is_cut_to_fit_dropping_the_oldest_turns_first():
    tok = get_tokenizer()
    msgs = conversation(20)
    assert len(prompt_ids(tok, msgs)) > 200
    fitted = fit_history(tok, msgs, budget=120)
    assert len(prompt_ids(tok, fitted)) <= 120
    assert fitted[0] == SYSTEM and fitted[-1] == msgs[-1]
    # What is kept is the newest part of the conversation, whole turns, starting with a user turn.
    assert fitted[1:] == msgs[len(msgs) - len(fitted) + 1:] and fitted[1]["role"] == "user"
    # And as much of it as fits: one more turn would not.
    one_more = msgs[len(msgs) - len(fitted) - 1:]
    assert len(prompt_ids(tok, [SYSTEM, *one_more])) > 120


def test_a_conversation_that_fits_is_kept_whole_and_rendered_as_chatml():
    tok = get_tokenizer()
    msgs = conversation(2)
    assert fit_history(tok, msgs, budget=1000) == msgs
    ids = prompt_ids(tok, msgs)
    assert ids[0] == EOT and ids[1:] == tok.render_chat(msgs, add_generation_prompt=True).ids


def test_a_message_too_long_for_the_context_is_a_user_error():
    tok = get_tokenizer()
    with pytest.raises(UserError, match="write less"):
        fit_history(tok, [SYSTEM, {"role": "user", "content": "word " * 200}], budget=64)


def test_the_too_long_message_error_reads_as_english():
    tok = get_tokenizer()
    with pytest.raises(UserError, match="^your message takes [0-9]+ tokens"):
        fit_history(tok, [{"role": "user", "content": "word " * 200}], budget=64)
    with pytest.raises(UserError, match="^the system message and your message take [0-9]+ tokens"):
        fit_history(tok, [SYSTEM, {"role": "user", "content": "word " * 200}], budget=64)


def test_reply_streams_the_answer_it_records(model):
    tok = get_tokenizer()
    session = ChatSession(model, tok, system=SYSTEM["content"], max_new_tokens=12, temperature=0)
    pieces = list(session.reply("Who has the kite?"))
    expected = generate(model, prompt_ids(tok, session.messages[:-1]), 12, temperature=0, stop_ids=STOP_IDS)
    answer = tok.decode(list(expected))
    assert "".join(pieces) == answer and len(pieces) > 1
    assert session.messages == [SYSTEM, {"role": "user", "content": "Who has the kite?"},
                                {"role": "assistant", "content": answer}]


def test_many_turns_stay_within_the_context_and_keep_the_system_message(model):
    tok = get_tokenizer()
    session = ChatSession(model, tok, system=SYSTEM["content"], max_new_tokens=20, temperature=1.0, seed=3)
    dropped = 0
    for i in range(12):
        "".join(session.reply(f"Tell me about story number {i}, please."))
        dropped += session.dropped
        assert session.messages[0] == SYSTEM
        assert session.messages[-2] == {"role": "user", "content": f"Tell me about story number {i}, please."}
        # The prompt that was answered left room for the answer.
        assert len(prompt_ids(tok, session.messages[:-1])) <= 96 - 20
    assert dropped > 0
    session.reset()
    assert session.messages == [SYSTEM]


def test_a_stopped_answer_keeps_what_was_shown(model):
    tok = get_tokenizer()
    session = ChatSession(model, tok, max_new_tokens=30, temperature=0)
    stream = session.reply("Hello")
    shown = next(stream) + next(stream)
    stream.close()
    assert session.messages[-1] == {"role": "assistant", "content": shown}
    # The conversation goes on from there.
    "".join(session.reply("Go on"))
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]


def test_seeded_sessions_repeat():
    tok = get_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=96))

    def talk() -> list[str]:
        s = ChatSession(model, tok, max_new_tokens=8, temperature=1.0, top_k=None, seed=5)
        return ["".join(s.reply(q)) for q in ("Hi", "Again")]

    first = talk()
    assert talk() == first and first[0] != first[1]


def test_the_largest_seed_seeds_every_answer_and_a_larger_one_is_refused_at_once(model):
    # Answer k uses seed + k: with seed 2**64 - 1 the second answer overflowed torch's seed.
    tok = get_tokenizer()
    s = ChatSession(model, tok, max_new_tokens=4, temperature=1.0, seed=2**64 - 1)
    answers = ["".join(s.reply(q)) for q in ("Hi", "Again")]
    again = ChatSession(model, tok, max_new_tokens=4, temperature=1.0, seed=-1)  # the same 64 bits
    assert ["".join(again.reply(q)) for q in ("Hi", "Again")] == answers
    with pytest.raises(UserError, match="seed must be an integer"):
        ChatSession(model, tok, seed=2**64)


@pytest.mark.parametrize("special", sorted(SPECIAL_TOKENS.values()))
def test_a_special_token_ends_the_answer_and_is_never_shown(preferring, special):
    """The model writes a special id ~0.3 of the time: the answer ends there, and neither the
    printed pieces nor the history ever hold it as text."""
    tok = get_tokenizer()
    session = ChatSession(preferring(special), tok, max_new_tokens=60, temperature=1.0, top_k=None, seed=0)
    for question in ("Hi", "Again", "Once more"):
        shown = "".join(session.reply(question))
        assert not any(name in shown for name in SPECIAL_TOKENS), shown
        assert session.messages[-1] == {"role": "assistant", "content": shown}
        assert len(tok.encode(shown)) < 60  # it ended at the special id, not at the limit
