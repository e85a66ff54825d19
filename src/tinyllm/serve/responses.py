"""The JSON shapes OpenAI's API answers with: completion bodies, stream chunks, usage, SSE framing.

Why it is shaped this way: chat completions and text completions differ only in a few field
names (`message`/`delta` vs `text`, `chat.completion` vs `text_completion`), so both are built
here from one `ResponseMeta` and the kind, and the endpoints never spell out a response by hand.
Field order and names follow OpenAI's API reference, which is what the `openai` client parses.
Log-probabilities come in the two shapes of that reference: the legacy completions one (parallel
lists `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`, which lm-evaluation-harness
reads) and chat's list of `content` entries with each token's bytes.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from tinyllm.inference.logprobs import TokenScores
from tinyllm.tokenizer import Tokenizer

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


def completion_body(
    meta: ResponseMeta,
    results: list[tuple[str, str]],
    usage_: dict,
    logprobs: list[dict] | None = None,
) -> dict:
    """The non-streaming answer; `results` holds (text, finish_reason) per choice index."""
    lps = logprobs or [None] * len(results)
    if meta.kind == CHAT:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": lp,
                "finish_reason": reason,
            }
            for i, ((text, reason), lp) in enumerate(zip(results, lps, strict=True))
        ]
    else:
        choices = [
            {"text": text, "index": i, "logprobs": lp, "finish_reason": reason}
            for i, ((text, reason), lp) in enumerate(zip(results, lps, strict=True))
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
    logprobs: dict | None = None,
) -> dict:
    """One streamed piece of choice `index`: the role (chat's first chunk), text, or the finish."""
    if meta.kind == CHAT:
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }
        obj = "chat.completion.chunk"
    else:
        choice = {
            "text": text or "",
            "index": index,
            "logprobs": logprobs,
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


def text_offsets(tok: Tokenizer, ids: list[int]) -> list[int]:
    """Where each token's text starts in the text of `ids` (in characters, as a client indexes)."""
    offsets, seen = [], b""
    for i in ids:
        offsets.append(len(seen.decode("utf-8", errors="replace")))
        seen += tok.text_bytes([i])
    return offsets


def completion_logprobs(
    tok: Tokenizer, scores: TokenScores, start: int, stop: int, offsets: list[int]
) -> dict:
    """The legacy completions shape for positions [start, stop) of `scores`.

    A position without context (the first of a token-id prompt) has null logprob and
    top_logprobs, as in OpenAI's echo.
    """
    span = range(start, stop)
    return {
        "tokens": [tok.token_str(scores.ids[t]) for t in span],
        "token_logprobs": [scores.logprobs[t] for t in span],
        "top_logprobs": [
            None if t == 0 else {tok.token_str(i): lp for i, lp in scores.top[t]} for t in span
        ],
        "text_offset": offsets,
    }


def chat_logprobs(tok: Tokenizer, scores: TokenScores, start: int, stop: int) -> dict:
    """The chat shape (`content` entries with token, logprob, bytes, top_logprobs) for [start, stop)."""

    def entry(i: int, lp: float | None) -> dict:
        return {"token": tok.token_str(i), "logprob": lp, "bytes": list(tok.decode_bytes([i]))}

    content = [
        {
            **entry(scores.ids[t], scores.logprobs[t]),
            "top_logprobs": [entry(i, lp) for i, lp in scores.top[t]],
        }
        for t in range(start, stop)
    ]
    return {"content": content, "refusal": None}
