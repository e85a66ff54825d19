"""vLLM's tokenizer endpoints (`/tokenizer_info`, `/tokenize`, `/detokenize`), for eval harnesses.

Why it is shaped this way: lm-evaluation-harness scores a continuation by counting its context in
tokens, so it needs the served model's tokenizer. Its `local-completions` model looks for these
endpoints (the ones vLLM serves) and, finding them, tokenizes through the server: nothing to
download and nothing that can disagree with the model. `/tokenize` reads special-token names in the
text as those tokens, as a Hugging Face tokenizer does (the harness asks it for the id of
`eos_token` that way); the completions endpoints keep treating such names as plain text.
"""

from __future__ import annotations

import re

from fastapi import FastAPI, Request

from tinyllm.serve.errors import APIError
from tinyllm.serve.schemas import _Strict, parse_body
from tinyllm.tokenizer import SPECIAL_TOKENS, Tokenizer

_SPECIAL = re.compile("(" + "|".join(re.escape(name) for name in SPECIAL_TOKENS) + ")")


class TokenizeRequest(_Strict):
    prompt: str
    add_special_tokens: bool = False  # GPT-2's tokenizer adds none either way
    model: str | None = None


class DetokenizeRequest(_Strict):
    tokens: list[int]
    model: str | None = None


def encode_with_specials(tokenizer: Tokenizer, text: str) -> list[int]:
    """`text`'s ids, special-token names becoming their ids (pieces between are ordinary text)."""
    ids: list[int] = []
    for piece in _SPECIAL.split(text):
        ids += [SPECIAL_TOKENS[piece]] if piece in SPECIAL_TOKENS else tokenizer.encode(piece)
    return ids


def add_tokenizer_routes(app: FastAPI, tokenizer: Tokenizer, context_length: int) -> None:
    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        # No bos_token: GPT-2 has none, and the harness then conditions an empty context on eos.
        return {
            "tokenizer_class": "GPT2TokenizerFast",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|pad|>",
            "model_max_length": context_length,
        }

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        req = parse_body(TokenizeRequest, await request.body())
        ids = encode_with_specials(tokenizer, req.prompt)
        return {"count": len(ids), "max_model_len": context_length, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        req = parse_body(DetokenizeRequest, await request.body())
        bad = [t for t in req.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(
                400,
                f"invalid 'tokens': token id {bad[0]} is outside the vocabulary "
                f"[0, {tokenizer.vocab_size})",
                param="tokens",
                code="invalid_value",
            )
        return {"prompt": tokenizer.decode(req.tokens)}
