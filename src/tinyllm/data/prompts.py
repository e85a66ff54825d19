"""Sample prompts from a prepared dataset: the openings of its first val documents.

Why it is shaped this way:
- A fixed prompt speaks for one corpus only ("Once upon a time" on Shakespeare shows nothing).
  The start of a held-out document is in the run's own register, and the model never trained on
  it; val documents are also the same whatever the training position, so samples compare across
  steps and runs on the same data.
- Sources take turns (the first document of each, then the second of each, ...), so a mix shows
  each of its kinds of text.
- An opening is the document's plain text before its first special token (the text before a
  chat starts), at most `max_tokens` tokens and at most half of it (the model has something of
  the document left to write), then cut back to the last sentence end, else the last word end,
  so a sample never starts mid-word. A document with no such text (a chat from its first token)
  gives no prompt.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from itertools import zip_longest
from pathlib import Path

import numpy as np

from tinyllm.data.manifest import load_manifest
from tinyllm.data.shards import Shard
from tinyllm.tokenizer import EOT, VOCAB_SIZE, get_tokenizer

# A sentence ends at . ! ? (with closing quotes or brackets) before a space, or at a line end.
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s|$)|(?=\n)")


def opening_prompts(data_dir: str | Path, n: int = 3, max_tokens: int = 32) -> list[str]:
    """Up to `n` prompts: the openings of the dataset's first val documents (module docstring)."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    per_source = [_val_documents(data_dir, entry["splits"]["val"]) for entry in manifest["sources"].values()]
    tok = get_tokenizer()
    prompts: list[str] = []
    for turn in zip_longest(*per_source):
        for tokens in turn:
            text = opening(tokens, tok.decode, max_tokens) if tokens is not None else ""
            if text and text not in prompts:
                prompts.append(text)
            if len(prompts) == n:
                return prompts
    return prompts


def opening(tokens: np.ndarray, decode, max_tokens: int) -> str:
    """The opening of one document's ids [n]: see the module docstring. `decode`: ids -> text."""
    special = np.flatnonzero(tokens >= EOT)  # <|endoftext|>, the chat tokens and <|pad|> sit above GPT-2's ids
    plain = tokens[: special[0]] if len(special) else tokens
    head = plain[: min(max_tokens, len(plain) // 2)]
    text = decode(head.tolist()).rstrip("\ufffd")  # a character the cut split in two
    floor = len(text) // 3  # a cut may not leave less than a third of the text
    ends = [m.end() for m in _SENTENCE_END.finditer(text) if m.end() > floor]
    if ends:
        return text[: ends[-1]].strip()
    spaces = [m.start() for m in re.finditer(r"\s", text) if m.start() > floor]
    return (text[: spaces[-1]] if spaces else text).strip()


def _val_documents(data_dir: Path, split: dict) -> Iterator[np.ndarray]:
    """One source's val documents, in order, read as they are asked for."""
    for entry in split["shards"]:
        shard = Shard(data_dir / entry["file"], VOCAB_SIZE)  # the loader checks the CRC; a prompt need not
        for i in range(shard.n_docs):
            yield np.asarray(shard.document(i), dtype=np.int64)
