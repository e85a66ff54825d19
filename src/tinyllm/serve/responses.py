"""The JSON shapes OpenAI's API answers with: completion bodies, stream chunks, usage, SSE framing.

Why it is shaped this way: chat completions and text completions differ only in a few field
names (`message`/`delta` vs `text`, `chat.completion` vs `text_completion`), so both are built
here from one `ResponseMeta` and the kind, and the endpoints never spell out a response by hand.
Field order and names follow OpenAI's API reference, which is what the `openai` client parses.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

CHAT = "chat"
TEXT = "text"

SSE_DONE = "data: [DONE]\n\n"


@dataclass(frozen=True)
class ResponseMeta:
    """What every body and chunk of one response repeats."""

    kind: str  # CHAT or TEXT
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if self.kind not in (CHAT, TEXT):
            raise ValueError(f"kind must be {CHAT!r} or {TEXT!r}, got {self.kind!r}")
        if not self.id:
            prefix = "chatcmpl" if self.kind == CHAT else "cmpl"
            object.__setattr__(self, "id", f"{prefix}-{uuid.uuid4().hex}")


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(meta: ResponseMeta, results: list[tuple[str, str]], usage_: dict) -> dict:
    """The non-streaming answer; `results` holds (text, finish_reason) per choice index."""
    if meta.kind == CHAT:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": reason,
            }
            for i, (text, reason) in enumerate(results)
        ]
    else:
        choices = [
            {"text": text, "index": i, "logprobs": None, "finish_reason": reason}
            for i, (text, reason) in enumerate(results)
        ]
    obj = "chat.completion" if meta.kind == CHAT else "text_completion"
    return {
        "id": meta.id,
        "object": obj,
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": usage_,
    }


def chunk(
    meta: ResponseMeta,
    index: int,
    *,
    text: str | None = None,
    role: bool = False,
    finish_reason: str | None = None,
    with_usage_field: bool = False,
) -> dict:
    """One streamed piece of choice `index`: the role (chat's first chunk), text, or the finish."""
    if meta.kind == CHAT:
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {
            "text": text or "",
            "index": index,
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        obj = "text_completion"
    out = {
        "id": meta.id,
        "object": obj,
        "created": meta.created,
        "model": meta.model,
        "choices": [choice],
    }
    if (
        with_usage_field
    ):  # OpenAI sends "usage": null on every chunk when the last one carries usage
        out["usage"] = None
    return out


def usage_chunk(meta: ResponseMeta, usage_: dict) -> dict:
    """The extra last chunk `stream_options.include_usage` asks for: no choices, only usage."""
    obj = "chat.completion.chunk" if meta.kind == CHAT else "text_completion"
    return {
        "id": meta.id,
        "object": obj,
        "created": meta.created,
        "model": meta.model,
        "choices": [],
        "usage": usage_,
    }


def sse(obj: dict) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"
