"""Property tests: the shard reader and the server's request parser never fail except cleanly.

- Shard reader: random bytes, and random damage to a valid shard (flipped bytes, cuts, appended
  bytes, rewritten header fields), either load as a shard whose documents all read back, or raise
  a UserError naming the file. Never another exception, never a crash.
- Server: random JSON bodies (anything, and mutations of valid requests) posted to
  /v1/completions and /v1/chat/completions never get a 500: a 200, or a 4xx with an OpenAI error.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tinyllm.data.shards import HEADER, MAGIC, Shard, ShardWriter
from tinyllm.errors import UserError
from tinyllm.model.gpt import GPT, GPTConfig
from tinyllm.serve import create_app
from tinyllm.tokenizer import EOT, VOCAB_SIZE, get_tokenizer

DOCS = [[10, 11, 12, EOT], [50255, EOT], [7, 8, EOT], [65, 66, 67, 68, 69, EOT], [EOT]]
MASKS = [[0, 1, 1, 0], [1, 0], [0, 0, 1], [0, 0, 1, 1, 1, 0], [0]]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def open_shard(path, raw: bytes, expect: dict | None) -> None:
    """Write `raw` to `path` and open it; on success every document and mask must read back."""
    path.write_bytes(raw)
    try:
        shard = Shard(path, VOCAB_SIZE, expect=expect)
    except UserError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return
    for i in range(shard.n_docs):
        doc = shard.document(i)
        assert len(doc) >= 1 and doc[-1] == EOT
    if shard.has_mask:
        assert len(shard.assistant(0, shard.n_tokens)) == shard.n_tokens
    del shard  # release the maps before the file is rewritten


@FUZZ
@given(raw=st.binary(max_size=400))
def test_random_bytes_are_refused_cleanly(tmp_path, raw):
    open_shard(tmp_path / "s.bin", raw, None)


@FUZZ
@given(raw=st.binary(min_size=0, max_size=200))
def test_random_bytes_behind_a_valid_magic_are_refused_cleanly(tmp_path, raw):
    open_shard(tmp_path / "s.bin", MAGIC + raw, None)


@pytest.fixture(scope="module")
def shard_bytes(tmp_path_factory) -> tuple[bytes, dict]:
    path = tmp_path_factory.mktemp("shard") / "s.bin"
    w = ShardWriter(path, VOCAB_SIZE)
    w.add(DOCS, MASKS)
    info = w.close().to_json()
    return path.read_bytes(), info


damage = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4)),
    st.tuples(st.just("cut"), st.integers(0, 10**6)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("header"), st.tuples(st.integers(0, 4), st.integers(0, 2**64 - 1))),
)


def damaged(raw: bytes, how: tuple) -> bytes:
    """`raw` with the damage `how` (a draw of `damage`) done to it."""
    kind, arg = how
    out = bytearray(raw)
    if kind == "flip":
        for at, bits in arg:
            out[at % len(out)] ^= bits
    elif kind == "cut":
        out = out[: arg % len(out)]
    elif kind == "append":
        out += arg
    else:  # overwrite one header field with an arbitrary value of its width
        field, value = arg
        fields = list(HEADER.unpack(raw[: HEADER.size]))
        widths = [8, 4, 4, 8, 8]
        if field == 0:
            fields[0] = value.to_bytes(8, "little")
        else:
            fields[field] = value % (1 << (8 * widths[field]))
        out[: HEADER.size] = HEADER.pack(*fields)
    return bytes(out)


@FUZZ
@given(how=damage, with_manifest=st.booleans())
def test_damaged_shards_load_correctly_or_are_refused_cleanly(tmp_path, shard_bytes, how, with_manifest):
    raw, info = shard_bytes
    open_shard(tmp_path / "s.bin", damaged(raw, how), info if with_manifest else None)


def test_damage_that_the_manifest_would_catch_is_caught(tmp_path, shard_bytes):
    """A sanity check on the property above: flipping a token is refused, not loaded."""
    raw, info = shard_bytes
    at = HEADER.size + 2  # the second token
    assert struct.unpack_from("<H", raw, at)[0] == 11
    with pytest.raises(UserError, match="CRC"):
        path = tmp_path / "s.bin"
        path.write_bytes(damaged(raw, ("flip", [(at, 1)])))
        Shard(path, VOCAB_SIZE, expect=info)


# -- the server -------------------------------------------------------------------------------

MODEL = "fuzz-tiny"


@pytest.fixture(scope="module")
def client():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=48, n_layer=1, n_head=2, n_embd=16))
    app = create_app(model, get_tokenizer(), model_name=MODEL, max_choices=4, threads=1)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def mostly(plausible: st.SearchStrategy) -> st.SearchStrategy:
    """Usually a plausible value (so requests get past validation and generate), else any JSON."""
    return weighted(plausible, json_values, 0.9)


def weighted(first: st.SearchStrategy, second: st.SearchStrategy, p_first: float) -> st.SearchStrategy:
    # st.one_of does not weigh its branches; this draws `first` with probability about p_first.
    return st.integers(0, 99).flatmap(lambda k: first if k < 100 * p_first else second)


texts = st.text(max_size=30)
token_ids = st.lists(st.integers(-2, VOCAB_SIZE + 2), min_size=1, max_size=6)
parts = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text"] * 4 + ["image_url"]), "text": texts}), max_size=2)
messages = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["system", "developer", "user", "assistant"] * 3 + ["tool"]),
    "content": mostly(texts | parts)}), min_size=1, max_size=3) | st.just([])
common = {
    "max_tokens": mostly(st.integers(1, 8) | st.integers(-1, 60)),
    "temperature": mostly(st.floats(0, 2) | st.floats(-0.5, 2.5)),
    "top_p": mostly(st.floats(0.01, 1) | st.floats(-0.2, 1.2)),
    "top_k": mostly(st.integers(1, 60000) | st.integers(-1, 1)),
    "stop": mostly(texts | st.lists(st.text(max_size=3), max_size=6)),
    "seed": mostly(st.integers(-(2**65), 2**65)),
    "n": mostly(st.integers(1, 3) | st.integers(-1, 6)),
    "stream": mostly(st.booleans()),
    "stream_options": mostly(st.fixed_dictionaries({"include_usage": mostly(st.booleans())})),
    "logprobs": mostly(st.none() | st.booleans() | st.integers(-1, 6)),
    "user": json_values,
    "presence_penalty": mostly(st.floats(-2, 2)),
    "logit_bias": mostly(st.dictionaries(st.integers(0, VOCAB_SIZE - 1).map(str), st.floats(-100, 100), max_size=3)
                         | st.dictionaries(st.integers(-2, VOCAB_SIZE + 2).map(str) | st.text(max_size=3),
                                           st.floats(-120, 120) | st.integers(-120, 120), max_size=3)),
    "response_format": mostly(st.fixed_dictionaries({"type": st.sampled_from(["text"] * 3 + ["json_object"])})),
}
models = weighted(st.just(MODEL), st.sampled_from(["", "other"]) | json_values, 0.9)
completion_bodies = st.fixed_dictionaries(
    {"model": models, "prompt": mostly(texts | st.lists(texts, max_size=3) | token_ids | st.lists(token_ids, max_size=3))},
    optional={**common, "echo": mostly(st.booleans()), "suffix": mostly(texts)})
chat_bodies = st.fixed_dictionaries(
    {"model": models, "messages": mostly(messages)},
    optional={**common, "max_completion_tokens": mostly(st.integers(1, 8) | st.integers(-1, 60))})
# Some bodies lose a required field or are not objects at all.
bodies = {
    "/v1/completions": weighted(completion_bodies, completion_bodies.map(lambda b: {k: v for k, v in b.items() if k != "prompt"}) | json_values, 0.85),
    "/v1/chat/completions": weighted(chat_bodies, chat_bodies.map(lambda b: {k: v for k, v in b.items() if k != "model"}) | json_values, 0.85),
}


def check_response(r) -> None:
    """A 4xx with an OpenAI error, or a 200 whose every part is an answer: never a failure.

    A generation that fails after a stream has begun can only say so in an error event (the 200
    is already sent), so each event of a stream is checked, not just the status and [DONE].
    """
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = stream_events(r.text)
        assert events and events[-1] == "[DONE]", r.text
        for e in events[:-1]:
            assert "error" not in e and ("choices" in e or "usage" in e), r.text
    else:
        body = r.json()
        assert "error" not in body and body["choices"], r.text


def stream_events(text: str) -> list:
    """The data of each server-sent event: parsed JSON, or the final "[DONE]"."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: ") and "\n" not in block, repr(block)
        data = block.removeprefix("data: ")
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


@settings(max_examples=200, deadline=None)
@given(data=st.data(), path=st.sampled_from(sorted(bodies)))
def test_random_json_bodies_never_get_a_500(client, data, path):
    body = data.draw(bodies[path])
    # Generation stays short: a tiny model and at most 48 positions, so each example is quick.
    r = client.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    check_response(r)
    # What the examples reached (pytest --hypothesis-show-statistics): a third or so generate.
    event(f"{r.status_code} {r.json()['error']['param'] if r.status_code >= 400 else ''}")


@settings(max_examples=60, deadline=None)
@given(raw=st.binary(max_size=60), path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_random_bytes_as_a_body_get_a_400(client, raw, path):
    r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 or (r.status_code == 200 and _is_json_object(raw)), r.text


def _is_json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except ValueError:
        return False


def test_the_fuzzed_model_can_answer():
    """The property above is not vacuous: valid requests of the same shapes succeed."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=48, n_layer=1, n_head=2, n_embd=16))
    app = create_app(model, get_tokenizer(), model_name=MODEL, threads=1)
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "Once", "max_tokens": 3})
        assert r.status_code == 200 and len(r.json()["choices"]) == 1
        check_response(r)
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 2, "stream": True})
        assert r.status_code == 200
        check_response(r)
