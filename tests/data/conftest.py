"""Shared helpers for the data tests: small in-memory sources and a one-call prepare."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tinyllm.data.document import Document
from tinyllm.data.local import ReadCounters
from tinyllm.data.prepare import PrepareOptions, prepare
from tinyllm.data.sources import Source

WORDS = ("the cat sat on a mat and then it ran to see the red dog who was very happy "
         "because sun shone over hills where birds sang old songs").split()


def make_docs(n: int, seed: int = 0, words: tuple[str, ...] = WORDS, min_words: int = 3, max_words: int = 60) -> list[Document]:
    """n distinct small English-like documents (distinct because each starts with its number)."""
    rng = random.Random(seed)
    return [
        Document(text=f"{i}. " + " ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words))) + ".")
        for i in range(n)
    ]


class ListSource(Source):
    """A finite source over a list; `fail_after` raises KeyboardInterrupt after that many records."""

    max_tokens = None

    def __init__(self, name: str, docs: list[Document], weight: float = 1.0, fail_after: int | None = None,
                 split: str | None = None) -> None:
        self.name, self.spec, self.weight, self.docs, self.split = name, name, weight, docs, split
        self.fail_after = fail_after
        self.counters = ReadCounters()

    def identity(self) -> dict:
        digest = hashlib.sha256("\x00".join(d.rendered() for d in self.docs).encode()).hexdigest()
        return {"kind": "test", "documents": digest}

    def documents(self, start: int = 0) -> Iterator[Document]:
        for i in range(start, len(self.docs)):
            if self.fail_after is not None and i >= self.fail_after:
                raise KeyboardInterrupt
            yield self.docs[i]


@pytest.fixture
def quiet_prepare():
    """prepare() without a progress bar, with options as keyword arguments."""

    def run(sources: list[Source], out: Path, **options) -> dict:
        return prepare(sources, out, PrepareOptions(progress=False, **options))

    return run
