"""Request parsing: what is accepted is normalised; what is not names the offending field."""

from __future__ import annotations

import json

import pytest

from tinyllm.serve.errors import APIError
from tinyllm.serve.schemas import ChatCompletionRequest, CompletionRequest, parse_body


def chat(**fields) -> bytes:
    return json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    ).encode()


def test_text_parts_are_joined_and_developer_becomes_system():
    body = json.dumps(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Hello, "},
                        {"type": "text", "text": "you"},
                    ],
                },
            ],
        }
    ).encode()
    req = parse_body(ChatCompletionRequest, body)
    assert [m.as_chatml() for m in req.messages] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello, you"},
    ]


def test_stop_is_always_a_list_and_defaults_are_unset():
    assert parse_body(ChatCompletionRequest, chat(stop="###")).stop_strings == ["###"]
    req = parse_body(ChatCompletionRequest, chat())
    assert req.stop_strings == [] and req.temperature is None and req.token_limit is None
    assert not req.include_usage


def test_max_completion_tokens_wins_over_max_tokens():
    assert (
        parse_body(ChatCompletionRequest, chat(max_tokens=5, max_completion_tokens=9)).token_limit
        == 9
    )


def test_integers_are_valid_floats_but_strings_are_not_numbers():
    assert parse_body(ChatCompletionRequest, chat(temperature=1)).temperature == 1.0
    with pytest.raises(APIError) as e:
        parse_body(ChatCompletionRequest, chat(temperature="1"))
    assert e.value.param == "temperature"


def test_union_errors_name_the_field_once():
    with pytest.raises(APIError) as e:
        parse_body(CompletionRequest, b'{"model": "m", "prompt": [1, "two"]}')
    assert e.value.param == "prompt" and "token ids" in e.value.message
    with pytest.raises(APIError) as e:
        parse_body(
            ChatCompletionRequest,
            chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
        )
    assert e.value.param == "messages.0.content" and "text parts" in e.value.message


@pytest.mark.parametrize("prompt", ["", "text", ["a", "b"], [1, 2], [[1], [2, 3]]])
def test_every_openai_prompt_form_is_accepted(prompt):
    assert (
        parse_body(CompletionRequest, json.dumps({"model": "m", "prompt": prompt}).encode()).prompt
        == prompt
    )
