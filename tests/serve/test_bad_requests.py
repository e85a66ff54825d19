"""Bad requests get OpenAI-style error bodies and 4xx codes, never a 500 or a hung connection."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from tinyllm.serve import BackgroundServer

CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"


def chat_body(model: str, **extra) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        **extra,
    }


def post(server, path: str, body, *, timeout: float = 10) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        server.url + path,
        content=content,
        headers={"Content-Type": "application/json"},
        timeout=timeout,
    )


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param
    return err


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"a string"', b'{"model": "x",'])
def test_malformed_json_is_400(server, raw):
    assert_openai_error(post(server, CHAT, raw), 400)


@pytest.mark.parametrize(
    "path, missing", [(CHAT, "messages"), (CHAT, "model"), (TEXT, "prompt"), (TEXT, "model")]
)
def test_missing_fields_are_400_naming_the_field(server, model_name, path, missing):
    body = chat_body(model_name) if path == CHAT else {"model": model_name, "prompt": "hi"}
    del body[missing]
    err = assert_openai_error(post(server, path, body), 400, param=missing)
    assert missing in err["message"]


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", "5"),
        ("max_tokens", 2.5),
        ("temperature", "hot"),
        ("stream", "yes"),
        ("n", True),
        ("messages", "hi"),
        ("messages", [{"role": "user", "content": 5}]),
        ("stop", 7),
        ("seed", "1"),
    ],
)
def test_wrong_types_are_400(server, model_name, field, value):
    assert_openai_error(post(server, CHAT, chat_body(model_name, **{field: value})), 400)


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("max_tokens", 10**9),
        ("temperature", -0.1),
        ("temperature", 2.5),
        ("top_p", 0),
        ("top_p", 1.5),
        ("n", 0),
        ("n", 1000),
        ("presence_penalty", 2.5),  # taken, not applied; but in OpenAI's range, as OpenAI checks it
        ("frequency_penalty", -3),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", ""),
        ("messages", []),
        ("messages", [{"role": "robot", "content": "hi"}]),
    ],
)
def test_out_of_range_values_are_400(server, model_name, field, value):
    err = assert_openai_error(post(server, CHAT, chat_body(model_name, **{field: value})), 400)
    assert err["param"].split(".")[0] == field


def test_prompt_longer_than_the_context_is_400(server, model_name):
    long_text = "word " * 400  # > 256 tokens, the test model's context
    err = assert_openai_error(
        post(server, TEXT, {"model": model_name, "prompt": long_text}), 400, param="prompt"
    )
    assert err["code"] == "context_length_exceeded"
    body = chat_body(model_name, messages=[{"role": "user", "content": long_text}])
    body.pop("max_tokens")
    assert_openai_error(post(server, CHAT, body), 400, param="messages")


def test_prompt_plus_max_tokens_beyond_the_context_is_400(server, model_name):
    err = assert_openai_error(
        post(server, TEXT, {"model": model_name, "prompt": "hi", "max_tokens": 256}),
        400,
        param="max_tokens",
    )
    assert "256" in err["message"]


def test_token_ids_outside_the_vocabulary_are_400(server, model_name):
    assert_openai_error(
        post(server, TEXT, {"model": model_name, "prompt": [1, 50260]}), 400, param="prompt"
    )


def test_unknown_model_is_404(server):
    err = assert_openai_error(post(server, CHAT, chat_body("gpt-4")), 404, param="model")
    assert err["code"] == "model_not_found"
    assert_openai_error(httpx.get(server.url + "/v1/models/gpt-4"), 404)


def test_unsupported_features_are_refused_not_ignored(server, model_name):
    assert_openai_error(
        post(server, TEXT, {"model": model_name, "prompt": "a", "suffix": "b"}), 400, param="suffix"
    )
    image = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    assert_openai_error(
        post(server, CHAT, chat_body(model_name, messages=[{"role": "user", "content": image}])),
        400,
    )


@pytest.mark.parametrize("fmt", [{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x"}}])
def test_a_response_format_the_server_cannot_honour_is_400(server, model_name, fmt):
    for path, body in ((CHAT, chat_body(model_name)), (TEXT, {"model": model_name, "prompt": "a"})):
        err = assert_openai_error(post(server, path, {**body, "response_format": fmt}), 400,
                                  param="response_format")
        assert fmt["type"] in err["message"]
    r = post(server, CHAT, chat_body(model_name, response_format={"type": "text"}))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("bias", [{"50260": 1}, {"99999999999999999999": 1}, {"-1": 1}, {"a": 1},
                                  {"5": 100.5}, {"5": -101}, {"5": "1"}, [1, 2]])
def test_logit_bias_outside_token_ids_or_the_range_is_400(server, model_name, bias):
    for path, body in ((CHAT, chat_body(model_name)), (TEXT, {"model": model_name, "prompt": "a"})):
        assert_openai_error(post(server, path, {**body, "logit_bias": bias}), 400, param="logit_bias")


def test_integers_too_long_for_python_to_print_are_400_not_500(server, model_name):
    """JSON may carry a 4,300-digit integer, the most Python will turn into text and back; one
    more digit in a sum for the context error, or in a logit_bias key, was a 500."""
    huge = int("9" * 4300)
    for path, body, param in (
        (CHAT, chat_body(model_name, max_tokens=huge), "max_tokens"),
        (CHAT, chat_body(model_name, max_completion_tokens=huge), "max_completion_tokens"),
        (TEXT, {"model": model_name, "prompt": "a", "max_tokens": huge}, "max_tokens"),
        (TEXT, {"model": model_name, "prompt": ["a", "b"], "n": huge}, "n"),
        (TEXT, {"model": model_name, "prompt": "a", "logit_bias": {"9" * 5000: 1}}, "logit_bias"),
    ):
        assert_openai_error(post(server, path, body), 400, param=param)


def test_unknown_extra_fields_are_ignored(server, model_name):
    body = chat_body(model_name, user="u1", presence_penalty=0.5, some_future_field={"x": [1]})
    body["messages"][0]["name"] = "alice"
    r = post(server, CHAT, body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def test_oversized_body_is_413_with_or_without_content_length(tokenizer, make_model, model_name):
    with BackgroundServer(
        make_model(), tokenizer, model_name=model_name, max_body_bytes=2000
    ) as srv:
        big = chat_body(model_name, messages=[{"role": "user", "content": "x" * 5000}])
        assert_openai_error(post(srv, CHAT, big), 413)

        def chunks():  # chunked transfer encoding: no Content-Length to check up front
            data = json.dumps(big).encode()
            for i in range(0, len(data), 500):
                yield data[i : i + 500]

        r = httpx.post(
            srv.url + CHAT,
            content=chunks(),
            headers={"Content-Type": "application/json"},
            timeout=10,
        )
        assert_openai_error(r, 413)
        assert (
            post(srv, CHAT, chat_body(model_name)).status_code == 200
        )  # a small body still passes


def test_more_choices_than_the_server_can_ever_hold_is_400_not_429(tokenizer, make_model, model_name):
    # 429 says "retry later", and the openai client does, though the request can never fit.
    with BackgroundServer(
        make_model(), tokenizer, model_name=model_name, max_active=2, max_queued=1
    ) as srv:
        err = assert_openai_error(post(srv, CHAT, chat_body(model_name, n=4)), 400, "n")
        assert "at most 3" in err["message"]
        two_prompts = {"model": model_name, "prompt": ["a", "b"], "n": 2, "max_tokens": 2}
        assert_openai_error(post(srv, TEXT, two_prompts), 400, "n")
        assert post(srv, CHAT, chat_body(model_name, n=3)).status_code == 200


def test_too_many_prompts_are_refused_before_any_is_tokenized(server, model_name, tokenizer, monkeypatch):
    """A 1 MiB body of 200,000 one-letter prompts held the event loop, every other client's stream
    with it, for 1.5 s while each prompt was tokenized, only to be refused for its choices."""
    tokenized = []
    real = tokenizer.prompt_ids
    monkeypatch.setattr(tokenizer, "prompt_ids", lambda *a, **kw: tokenized.append(a) or real(*a, **kw))
    err = assert_openai_error(post(server, TEXT, {"model": model_name, "prompt": ["a"] * 17}), 400, "n")
    assert "17 choices" in err["message"]
    assert tokenized == []


def test_unknown_routes_and_methods_get_openai_errors(server):
    assert_openai_error(httpx.get(server.url + "/v1/engines"), 404)
    assert_openai_error(httpx.get(server.url + CHAT), 405)


def test_truncated_body_does_not_hang_the_connection(server):
    """A client that promises more body than it sends and hangs up gets its socket closed."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"model":'
        )
        s.shutdown(socket.SHUT_WR)
        s.settimeout(5)
        assert s.recv(65536) == b""  # closed by the server, within the timeout
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
