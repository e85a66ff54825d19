"""The builtin corpus: document i of seed s, its identity, its exact entropy floor, and its parse.

Why it is shaped this way: document i comes from `random.Random(blake2b(seed, i))`: random access,
identical across processes, and no draw shared between documents. The generator (`story`) also
runs on a parse tape to read a document back into its choices, and on a replay tape to walk a tiny
lexicon's whole distribution: the tests' proof that the corpus decodes uniquely.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from tinyllm.data.builtin.lexicon import DEFAULT_LEXICON, Lexicon
from tinyllm.data.builtin.story import END, generate, grammar
from tinyllm.data.builtin.tape import ParseError, ParseTape, SampleTape, enumerate_choices
from tinyllm.data.document import Document, tokenize_document
from tinyllm.tokenizer import Tokenizer

# 3: a colour follows its object ("found a kite. It was red.") and the story restates the facts the
#    questions ask for (", the little dog,", "looked at the kite.", "was still happy.");
# 2: "The kite is red." holds the story's token " red" for attention to copy; "Red." did not.
VERSION = 3


def _stream_seed(seed: int, index: int) -> int:
    """A stable 64-bit seed per (seed, index); Python's `hash` is salted per process."""
    digest = hashlib.blake2b(f"tinyllm-builtin:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class BuiltinCorpus:
    """Unlimited stories with questions; document i depends only on (seed, i)."""

    def __init__(self, seed: int = 0, *, lexicon: Lexicon | None = None) -> None:
        self.seed = int(seed)
        self.lexicon = lexicon or DEFAULT_LEXICON
        self._grammar = grammar(self.lexicon)

    def document(self, index: int) -> Document:
        if index < 0:
            raise ValueError(f"document index must be >= 0, got {index}")
        return generate(SampleTape(random.Random(_stream_seed(self.seed, index))), self._grammar)

    def documents(self, start: int = 0) -> Iterator[Document]:
        index = start
        while True:
            yield self.document(index)
            index += 1

    @property
    def identity(self) -> dict:
        ident = {"name": "builtin", "version": VERSION, "seed": self.seed}
        if self.lexicon != DEFAULT_LEXICON:
            # A custom grammar is a different dataset; name it by a digest of its words.
            ident["lexicon"] = hashlib.sha256(repr(self.lexicon.key()).encode()).hexdigest()[:16]
        return ident


def entropy_floor(docs: Iterable[Document], tok: Tokenizer) -> float:
    """-sum(logprob) / sum(tokens), in nats per token: the lowest loss any model can reach on `docs`.

    Tokens are `tokenize_document`'s ids, so the trailing <|endoftext|> counts.
    """
    nats, tokens = 0.0, 0
    for chunk in _chunks(docs, 1024):
        if any(d.logprob is None for d in chunk):
            raise ValueError("entropy_floor needs documents with a logprob (builtin corpus only)")
        nats -= math.fsum(d.logprob for d in chunk)
        text_ids = tok.encode_batch([d.text for d in chunk])
        tokens += sum(len(tokenize_document(tok, d, ids)) for d, ids in zip(chunk, text_ids, strict=True))
    if tokens == 0:
        raise ValueError("entropy_floor needs at least one document")
    return nats / tokens


def _chunks(items: Iterable[Document], size: int) -> Iterator[list[Document]]:
    chunk: list[Document] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass(frozen=True)
class Derivation:
    """A document with the choices that generate it and their summed log-probability."""

    choices: tuple[int, ...]
    logprob: float
    document: Document


def parse_document(doc: Document, lexicon: Lexicon | None = None) -> Derivation:
    """Recover the one choice sequence that generates `doc`; raise if none does.

    Raises `tape.ParseError` when `doc` is not a document of this grammar and
    `AmbiguityError` when a pick on the way offered options that are not prefix-free.
    """
    target = linear_text(doc)
    tape = ParseTape(target)
    again = generate(tape, grammar(lexicon or DEFAULT_LEXICON))
    if tape.pos != len(target):
        raise ParseError(f"text continues after the document ends at offset {tape.pos}")
    return Derivation(tuple(tape.choices), tape.logprob, again)


def enumerate_documents(lexicon: Lexicon) -> Iterator[Derivation]:
    """Every choice sequence a (tiny) lexicon allows, with its document: the whole distribution."""
    g = grammar(lexicon)
    for doc, tape in enumerate_choices(lambda tape: generate(tape, g)):
        yield Derivation(tuple(tape.choices), tape.logprob, doc)


def linear_text(doc: Document) -> str:
    """The document as the generator writes it: its rendering plus the final <|endoftext|>."""
    return doc.rendered() + END

