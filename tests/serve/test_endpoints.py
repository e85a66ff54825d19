"""What the endpoints do with a valid request: the model ids they answer to, and logit_bias."""

from __future__ import annotations

import httpx

from tinyllm.inference.sampling import generate
from tinyllm.serve.endpoints import MODEL_ALIAS
from tinyllm.tokenizer import STOP_IDS

PROMPT = [464, 3290, 318]  # "The dog is"


def complete(server, model: str, **extra) -> dict:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, **extra}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_served_name_is_listed_and_the_alias_is_answered_under_it(server, model_name):
    assert model_name != MODEL_ALIAS
    models = httpx.get(server.url + "/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [model_name]
    assert httpx.get(f"{server.url}/v1/models/{MODEL_ALIAS}", timeout=10).json()["id"] == model_name
    by_alias = complete(server, MODEL_ALIAS)
    assert by_alias["model"] == model_name
    assert by_alias["choices"] == complete(server, model_name)["choices"]


def test_logit_bias_forces_and_bans_tokens(server, model_name, tokenizer, make_model):
    model = make_model()  # the server's model
    first = next(generate(model, PROMPT, 1, temperature=0))
    forced = 1000 if first != 1000 else 1001
    # +100 makes one token the greedy choice every time; keys are strings, as JSON has them.
    r = complete(server, model_name, logit_bias={str(forced): 100})
    assert r["choices"][0]["text"] == tokenizer.decode([forced] * 6)
    assert r["usage"]["completion_tokens"] == 6
    # -100 on the greedy first token: the answer is the greedy one among the others.
    banned = complete(server, model_name, logit_bias={str(first): -100})["choices"][0]["text"]
    expected = list(generate(model, PROMPT, 6, temperature=0, stop_ids=STOP_IDS, logit_bias={first: -100}))
    assert expected[0] != first and banned == tokenizer.decode(expected)
