"""The official `openai` client works unchanged against the server, streaming and not."""

from __future__ import annotations

import httpx
import openai
import pytest

from tinyllm.serve import BackgroundServer
from tinyllm.tokenizer import SPECIAL_TOKENS, STOP_IDS

HELLO = [{"role": "user", "content": "Hello! How are you?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_models_lists_the_served_model(client, model_name):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name]
    assert client.models.retrieve(model_name).id == model_name


def test_chat_completion_counts_tokens_and_stops_at_max_tokens(client, tokenizer, model_name):
    r = client.chat.completions.create(
        model=model_name, messages=HELLO, max_tokens=7, temperature=0
    )
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 7
    assert r.usage.prompt_tokens == len(tokenizer.prompt_ids(messages=HELLO))
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    assert r.id.startswith("chatcmpl-") and r.model == model_name


def test_streamed_chat_equals_the_non_streamed_answer(client, model_name):
    kw = dict(model=model_name, messages=HELLO, max_tokens=12, temperature=0.9, seed=7)
    whole = client.chat.completions.create(**kw)
    chunks = list(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert (
        len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    )  # it really streamed


def test_same_seed_same_answer_and_n_choices_differ(client, model_name):
    kw = dict(model=model_name, messages=HELLO, max_tokens=10, temperature=1.0, seed=123, n=3)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1
    assert a.usage.completion_tokens == 30


def test_text_completion_streaming_and_not(client, tokenizer, model_name):
    whole = client.completions.create(
        model=model_name, prompt="Once upon a time", max_tokens=9, temperature=0
    )
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == len(tokenizer.prompt_ids("Once upon a time"))
    stream = client.completions.create(
        model=model_name, prompt="Once upon a time", max_tokens=9, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == whole.choices[0].text


def test_completions_default_to_16_tokens_and_accept_token_ids_and_echo(
    client, tokenizer, model_name
):
    ids = tokenizer.encode("The sky is")
    r = client.completions.create(model=model_name, prompt=ids, temperature=0, echo=True)
    assert r.usage.completion_tokens == 16
    assert r.choices[0].text.startswith("The sky is")
    batch = client.completions.create(
        model=model_name, prompt=["a", "b"], max_tokens=3, n=2, temperature=0
    )
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text  # greedy: n copies agree


def test_stop_string_cuts_the_text_streaming_and_not(client, model_name, server, wait_for):
    kw = dict(model=model_name, messages=HELLO, max_tokens=40, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3 and stop in full
    expected = full[: full.index(stop)]
    before = httpx.get(server.url + "/health").json()
    cut = client.chat.completions.create(**kw, stop=[stop, "never appears \u2603"])
    assert cut.choices[0].message.content == expected
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 40
    streamed = client.chat.completions.create(**kw, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected
    # Both ended as asked, "stop": /health counted them cancelled, as if their clients had gone.
    assert wait_for(lambda: httpx.get(server.url + "/health").json()["active"] == 0)
    after = httpx.get(server.url + "/health").json()
    assert after["jobs_finished"] - before["jobs_finished"] == 2
    assert after["jobs_cancelled"] == before["jobs_cancelled"]


def _text(choice) -> str:
    """A choice's text: chat or text completion, whole or a streamed chunk's."""
    for part in ("message", "delta"):
        if hasattr(choice, part):
            return getattr(choice, part).content or ""
    return choice.text or ""


@pytest.mark.parametrize("special", sorted(STOP_IDS))
def test_a_special_token_ends_the_choice_and_is_never_text(tokenizer, preferring, special):
    """Chat and text completions, streamed and not: a special id the model writes (each ~0.3 of
    the time here) ends the choice with "stop" and never reaches the client as text."""
    names = list(SPECIAL_TOKENS)
    with BackgroundServer(preferring(special), tokenizer, model_name="m") as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        for seed in range(3):
            chat = dict(model="m", messages=HELLO, max_tokens=60, seed=seed)
            text = dict(model="m", prompt="Hi", max_tokens=60, seed=seed)
            whole = [client.chat.completions.create(**chat), client.completions.create(**text)]
            streams = [client.chat.completions.create(**chat, stream=True),
                       client.completions.create(**text, stream=True)]
            for r, stream in zip(whole, streams, strict=True):
                content = _text(r.choices[0])
                assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 60
                assert not any(name in content for name in names), content
                chunks = [c.choices[0] for c in stream if c.choices]
                assert "".join(map(_text, chunks)) == content
                assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]


@pytest.mark.parametrize("special", sorted(STOP_IDS))
def test_a_special_token_forced_by_logit_bias_ends_the_choice_with_no_text(client, model_name, special):
    bias = {str(special): 100}  # the greedy choice at every step
    chat = dict(model=model_name, messages=HELLO, max_tokens=8, temperature=0, logit_bias=bias)
    text = dict(model=model_name, prompt="Hi", max_tokens=8, temperature=0, logit_bias=bias)
    for r in (client.chat.completions.create(**chat), client.completions.create(**text)):
        assert (_text(r.choices[0]), r.choices[0].finish_reason, r.usage.completion_tokens) == ("", "stop", 0)
    for stream in (client.chat.completions.create(**chat, stream=True),
                   client.completions.create(**text, stream=True)):
        chunks = [c.choices[0] for c in stream if c.choices]
        assert "".join(map(_text, chunks)) == ""
        assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]


def test_echo_gives_back_the_prompt_text_without_its_markup(client, tokenizer, model_name):
    # A text prompt starts after <|endoftext|> (`prompt_ids`); that id is not the client's text.
    for prompt in ("", "The sky is"):
        r = client.completions.create(model=model_name, prompt=prompt, max_tokens=3, temperature=0, echo=True)
        plain = client.completions.create(model=model_name, prompt=prompt, max_tokens=3, temperature=0)
        assert r.choices[0].text == prompt + plain.choices[0].text
    ids = [tokenizer.im_start_id, *tokenizer.encode("user")]
    r = client.completions.create(model=model_name, prompt=ids, max_tokens=1, temperature=0, echo=True)
    assert r.choices[0].text.startswith("user") and "<|im_start|>" not in r.choices[0].text


def test_client_errors_surface_as_openai_exceptions(client, model_name):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_name, messages=HELLO, max_tokens=100_000)
    assert e.value.code == "context_length_exceeded"


def test_streamed_choices_arrive_interleaved_and_match_the_whole_answer(client, model_name):
    kw = dict(model=model_name, messages=HELLO, max_tokens=8, temperature=1.0, seed=11, n=2)
    whole = client.chat.completions.create(**kw)
    texts, order = ["", ""], []
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.delta.content:
                order.append(c.index)
    assert texts == [c.message.content for c in whole.choices]
    assert order.index(1) < len(order) - 1 - order[::-1].index(
        0
    )  # choice 1 began before choice 0 ended


def test_the_client_reads_logprobs_of_both_endpoints(client, model_name):
    r = client.chat.completions.create(
        model=model_name, messages=HELLO, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.bytes for t in content)
    text = client.completions.create(
        model=model_name, prompt="Once upon", max_tokens=0, echo=True, logprobs=1
    )
    lp = text.choices[0].logprobs
    assert text.choices[0].text == "Once upon" and lp.tokens == ["Once", " upon"]
    assert lp.text_offset == [0, 4] and len(lp.token_logprobs) == len(lp.top_logprobs) == 2
