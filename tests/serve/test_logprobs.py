"""Log-probabilities: what lm-evaluation-harness and OpenAI clients read from the two endpoints.

The expected values come from `token_logprobs` on the server's own model (a second copy made by
the same seeded factory), so each test checks that the server scores the right tokens at the right
positions, not merely that it returns numbers.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tinyllm.inference.logprobs import token_logprobs

TEXT = "/v1/completions"
CHAT = "/v1/chat/completions"


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def ok(server, path: str, body: dict) -> dict:
    r = post(server, path, body)
    assert r.status_code == 200, r.text
    return r.json()


def test_echo_with_max_tokens_0_scores_the_prompt_text(server, model_name, tokenizer, make_model):
    prompt = "The dog is happy"
    body = {"model": model_name, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 3}
    out = ok(server, TEXT, body)
    choice = out["choices"][0]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 0
    ids = tokenizer.prompt_ids(prompt)  # <|endoftext|> + the text: the first is context only
    want = token_logprobs(make_model(), ids, 3)
    lp = choice["logprobs"]
    assert lp["tokens"] == [tokenizer.token_str(i) for i in ids[1:]]
    assert lp["token_logprobs"] == pytest.approx(want.logprobs[1:], abs=1e-4)
    assert lp["text_offset"] == [0, 3, 7, 10]
    for top, alternatives in zip(lp["top_logprobs"], want.top[1:], strict=True):
        assert list(top) == [tokenizer.token_str(i) for i, _ in alternatives]


def test_the_harness_request_sums_to_the_continuation_log_likelihood(
    server, model_name, tokenizer, make_model
):
    # What local-completions sends for one (context, continuation): token ids, echo, 1 new token.
    context, continuation = tokenizer.encode("The cat sat"), tokenizer.encode(" on the mat")
    body = {
        "model": model_name,
        "prompt": context + continuation,
        "max_tokens": 1,
        "echo": True,
        "logprobs": 1,
        "temperature": 0,
        "seed": 1234,
    }
    lp = ok(server, TEXT, body)["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(context) + len(continuation) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = token_logprobs(make_model(), context + continuation)
    got = sum(lp["token_logprobs"][len(context) : -1])
    assert got == pytest.approx(sum(want.logprobs[len(context) :]), abs=1e-4)
    # The generated token is greedy, so it is its own best alternative (the harness's is_greedy).
    assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())


def test_generated_tokens_carry_their_logprobs(server, model_name, tokenizer):
    body = {
        "model": model_name,
        "prompt": "Once upon",
        "max_tokens": 5,
        "temperature": 0,
        "logprobs": 2,
    }
    choice = ok(server, TEXT, body)["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] and len(lp["tokens"]) == 5
    # Offsets count from the start of the prompt's text, as OpenAI's do without echo.
    assert lp["text_offset"][0] == len("Once upon")
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert len(top) == 2 and chosen == max(top.values())  # greedy


def test_chat_logprobs_follow_the_chat_shape(server, model_name):
    body = {
        "model": model_name,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
    }
    choice = ok(server, CHAT, body)["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(c["token"] for c in content) == choice["message"]["content"]
    for c in content:
        assert bytes(c["bytes"]).decode() == c["token"]
        assert len(c["top_logprobs"]) == 3
        assert c["logprob"] == c["top_logprobs"][0]["logprob"]  # greedy: the best alternative
    plain = ok(server, CHAT, {**body, "logprobs": False, "top_logprobs": None})["choices"][0]
    assert plain["logprobs"] is None and plain["message"] == choice["message"]


def test_streamed_logprobs_equal_the_non_streamed_ones(server, model_name):
    chat = {
        "model": model_name,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 1,
    }
    text = {
        "model": model_name,
        "prompt": "Once",
        "max_tokens": 3,
        "temperature": 0,
        "echo": True,
        "logprobs": 1,
    }
    for path, body in ((CHAT, chat), (TEXT, text)):
        whole = ok(server, path, body)["choices"][0]
        r = post(server, path, {**body, "stream": True, "stream_options": {"include_usage": True}})
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        chunks = [
            json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")
        ]
        choices = [c["choices"][0] for c in chunks if c["choices"]]
        assert [c["logprobs"] for c in choices if c["logprobs"]] == [whole["logprobs"]]
        assert choices[-1]["finish_reason"] == whole["finish_reason"]
        assert chunks[-1]["usage"]["completion_tokens"] == body["max_tokens"]


def test_a_stop_string_cuts_the_logprobs_with_the_text(server, model_name):
    body = {
        "model": model_name,
        "prompt": "Once upon",
        "max_tokens": 8,
        "temperature": 0,
        "logprobs": 0,
    }
    full = ok(server, TEXT, body)["choices"][0]
    tokens = full["logprobs"]["tokens"]
    stop = tokens[3].strip() or tokens[3]
    cut = ok(server, TEXT, {**body, "stop": [stop]})["choices"][0]
    kept = cut["logprobs"]["tokens"]
    assert len(kept) < len(tokens) and kept == tokens[: len(kept)]
    assert "".join(kept).startswith(cut["text"])


@pytest.mark.parametrize(
    "path, extra, param",
    [
        (TEXT, {"logprobs": 6}, "logprobs"),
        (TEXT, {"logprobs": -1}, "logprobs"),
        (TEXT, {"logprobs": True}, "logprobs"),
        (TEXT, {"max_tokens": -1}, "max_tokens"),
        (CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (CHAT, {"top_logprobs": 2}, "top_logprobs"),
        (CHAT, {"logprobs": 1}, "logprobs"),
    ],
)
def test_bad_logprob_values_are_400_naming_the_parameter(server, model_name, path, extra, param):
    base = {"model": model_name, "max_tokens": 2}
    base.update(
        {"prompt": "hi"} if path == TEXT else {"messages": [{"role": "user", "content": "hi"}]}
    )
    r = post(server, path, {**base, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_the_tokenizer_endpoints_agree_with_the_tokenizer(server, tokenizer):
    info = httpx.get(server.url + "/tokenizer_info", timeout=10).json()
    assert info["eos_token"] == "<|endoftext|>"
    text = "Hello world<|endoftext|> again"
    r = httpx.post(server.url + "/tokenize", json={"prompt": text, "add_special_tokens": False})
    ids = r.json()["tokens"]
    assert ids == tokenizer.encode("Hello world") + [tokenizer.eot_id] + tokenizer.encode(" again")
    back = httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"]
    assert back == text
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
