"""Request bodies of the OpenAI endpoints, validated strictly, with errors an API client can read.

Why it is shaped this way:
- Validation is strict (pydantic strict mode over the raw JSON): `"max_tokens": "5"` is a wrong
  type, not a 5, as with OpenAI's own API. Fields the server does not know are ignored, so clients
  that send `user`, `tools` and the like keep working; `presence_penalty` and `frequency_penalty`
  are checked in OpenAI's range, then not applied.
- Only what can be checked without the model lives here. Limits that depend on the model (context
  length, vocabulary, how many choices a request may ask for) are checked where the model is known.
- `parse_body` turns pydantic's error list into one `APIError` with the offending field in
  `param`, the way OpenAI reports it, so the client shows "max_tokens: ..." rather than a dump.
"""

from __future__ import annotations

import re
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tinyllm.serve.errors import APIError

MAX_STOP_STRINGS = 4  # OpenAI's limit on `stop`
MAX_LOGIT_BIAS = 100  # OpenAI's range for a logit_bias value: [-100, 100]
MAX_LOGPROBS = 5  # OpenAI's limit on /v1/completions' `logprobs`
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on /v1/chat/completions' `top_logprobs`
# No vocabulary nears a billion ids; and int() refuses a string of over 4,300 digits (a 500).
_TOKEN_ID = re.compile(r"^[0-9]{1,9}$")

# Seeds torch.Generator.manual_seed accepts.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1
# Counts stop at int64, far past any model (OpenAI's stop at 2^31 - 1): JSON may carry 4,300 digits,
# and one more in the context error's sum or the choices' product made that error a 500.
_COUNT_MAX = 2**63 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    # Only "text" can be honoured; the endpoints refuse the others (json_object, json_schema).
    type: str


class _SamplingFields(_Strict):
    """What completions and chat completions share."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)  # not OpenAI's, but vLLM and others accept it
    max_tokens: int | None = Field(None, ge=1, le=_COUNT_MAX)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=_SEED_MIN, le=_SEED_MAX)
    n: int | None = Field(None, ge=1, le=_COUNT_MAX)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # Keys are token ids as JSON object keys (strings); whether they are in the vocabulary is
    # checked where the model is known.
    logit_bias: dict[str, float] | None = None
    # Taken and not applied (tinyllm's sampling has no penalties), so clients that send them keep
    # working; but checked in OpenAI's range, so a value OpenAI refuses is refused here too.
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    response_format: ResponseFormat | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_entries(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (v or {}).items():
            if not _TOKEN_ID.match(key):
                raise ValueError(f"key {key!r} is not a token id: keys are token ids such as \"50256\"")
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise ValueError(
                    f"the bias for token {key} is {value}: biases must be in "
                    f"[-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}]"
                )
        return v

    @property
    def token_bias(self) -> dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: str | list[str] | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(
                f"at most {MAX_STOP_STRINGS} stop sequences are allowed, got {len(stops)}"
            )
        if any(s == "" for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return stops

    @property
    def stop_strings(self) -> list[str]:
        return self.stop or []  # the validator has made a given value a list

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    # "developer" is OpenAI's newer name for "system"; the ChatML template knows only three roles.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def as_chatml(self) -> dict:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=_COUNT_MAX)  # max_tokens' newer name
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @property
    def token_limit(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )


class CompletionRequest(_SamplingFields):
    # A string, a batch of strings, a list of token ids, or a batch of lists of token ids.
    prompt: str | list[str] | list[int] | list[list[int]]
    # 0 is allowed here: with echo it scores the prompt alone (what lm-evaluation-harness sends).
    max_tokens: int | None = Field(None, ge=0, le=_COUNT_MAX)
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: str | list) -> str | list:
        if isinstance(v, list) and not v:
            raise ValueError("the prompt list is empty: give a string, or a non-empty array")
        if isinstance(v, list) and isinstance(v[0], list) and any(not p for p in v):
            raise ValueError("a token-id prompt must not be empty")
        return v

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


Body = TypeVar("Body", bound=BaseModel)

_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
_EXPECTED = {
    "prompt": "must be a string, an array of strings, an array of token ids "
    "or an array of arrays of token ids",
    "stop": "must be a string or an array of up to 4 strings",
    "content": 'must be a string or an array of text parts ({"type": "text", "text": ...}); '
    "no other content type is supported",
}


def parse_body(schema: type[Body], raw: bytes) -> Body:
    """Validate a raw JSON request body against `schema`, or raise a 400 `APIError`."""
    if not raw.strip():
        raise APIError(400, "the request body is empty: send a JSON object", code="invalid_json")
    try:
        return schema.model_validate_json(raw)
    except ValidationError as e:
        raise _as_api_error(e) from None


def _as_api_error(e: ValidationError) -> APIError:
    errors = e.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return APIError(
            400, f"the request body is not valid JSON ({first['msg']})", code="invalid_json"
        )
    if first["type"] == "model_type" and not first["loc"]:
        return APIError(400, "the request body must be a JSON object", code="invalid_json")
    param = _param(first["loc"])
    if first["type"] == "missing":
        return APIError(
            400, f"missing required field '{param}'", param=param, code="missing_required_field"
        )
    same_field = [err for err in errors if _param(err["loc"]) == param]
    field = param.rsplit(".", 1)[-1]
    if len(same_field) > 1 and field in _EXPECTED:  # a union: every branch failed
        detail = _EXPECTED[field]
    else:
        detail = first["msg"].removeprefix("Value error, ")
    return APIError(400, f"invalid '{param}': {detail}", param=param, code="invalid_value")


def _param(loc: tuple) -> str:
    """The dotted field path of a pydantic error location, without its union-branch tags."""
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(str(part))
        elif _FIELD_NAME.match(part) and part.lower() not in _TYPE_TAGS:
            parts.append(part)
        else:
            break
    return ".".join(parts)
