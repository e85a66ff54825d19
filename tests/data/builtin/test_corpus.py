"""The builtin corpus: deterministic, uniquely decodable, an exact entropy floor.

The tiny lexicons WIDE and PLOT (conftest) have choice trees small enough to enumerate completely.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from tinyllm.data.builtin import (
    DEFAULT_LEXICON,
    VERSION,
    BuiltinCorpus,
    Lexicon,
    ParseError,
    entropy_floor,
    linear_text,
    parse_document,
)
from tinyllm.data.document import Document, tokenize_document
from tinyllm.tokenizer import get_tokenizer

from .conftest import PLOT, WIDE, tree


# -- determinism ------------------------------------------------------------------------------
def test_document_depends_only_on_seed_and_index():
    a, b = BuiltinCorpus(0), BuiltinCorpus(0)
    forward = [a.document(i) for i in range(40)]
    backward = [b.document(i) for i in reversed(range(40))][::-1]
    assert forward == backward
    it = b.documents(start=10)
    assert [next(it) for _ in range(5)] == forward[10:15]
    other = BuiltinCorpus(1)
    assert all(other.document(i) != forward[i] for i in range(40))


def test_documents_are_identical_in_another_process_with_another_hash_seed():
    code = ("from tinyllm.data.builtin import BuiltinCorpus, linear_text\n"
            "c = BuiltinCorpus(3)\n"
            "print(repr([(linear_text(c.document(i)), c.document(i).logprob) for i in range(5)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    c = BuiltinCorpus(3)
    assert out.strip() == repr([(linear_text(c.document(i)), c.document(i).logprob) for i in range(5)])


def test_identity_names_corpus_version_seed_and_any_custom_lexicon():
    assert BuiltinCorpus(7).identity == {"name": "builtin", "version": VERSION, "seed": 7}
    custom = BuiltinCorpus(7, lexicon=WIDE).identity
    assert custom["lexicon"] and custom != BuiltinCorpus(7).identity
    assert BuiltinCorpus(7, lexicon=Lexicon(**{**WIDE.__dict__})).identity == custom


# -- document shape ---------------------------------------------------------------------------
def test_stories_end_with_newline_exactly_when_questions_follow():
    docs = [BuiltinCorpus(0).document(i) for i in range(600)]
    asked = [d for d in docs if d.messages]
    assert 0.42 < len(asked) / len(docs) < 0.58  # qa_share = 0.5
    for d in docs:
        assert d.text.endswith("\n") == bool(d.messages)
        assert d.text.startswith(DEFAULT_LEXICON.openings)
    for d in asked:
        roles = [m["role"] for m in d.messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert 1 <= len(roles) // 2 <= DEFAULT_LEXICON.max_questions
        questions = [m["content"] for m in d.messages[::2]]
        assert len(set(questions)) == len(questions)
    assert max(len(d.messages) // 2 for d in asked) == DEFAULT_LEXICON.max_questions


# -- unique decodability ----------------------------------------------------------------------
@pytest.mark.parametrize("lex", [WIDE, PLOT], ids=["wide", "plot"])
def test_every_choice_sequence_of_a_tiny_grammar_gives_a_distinct_document(lex):
    derivations = tree(lex)
    texts = [linear_text(d.document) for d in derivations]
    assert len(set(texts)) == len(texts)
    assert math.fsum(math.exp(d.logprob) for d in derivations) == pytest.approx(1.0, abs=1e-9)
    assert all(d.document.logprob == d.logprob for d in derivations)
    for d in derivations[::97]:
        back = parse_document(d.document, lex)
        assert back.choices == d.choices and back.logprob == pytest.approx(d.logprob, abs=1e-12)


def test_parser_recovers_the_logprob_of_sampled_documents():
    corpus = BuiltinCorpus(0)
    for i in range(1500):
        doc = corpus.document(i)
        back = parse_document(doc)  # checks every pick on the way offered prefix-free options
        assert back.document == doc
        assert back.logprob == pytest.approx(doc.logprob, abs=1e-9)


def test_equal_documents_have_equal_logprob():
    lex = Lexicon(**{**WIDE.__dict__, "max_sentences": 4})
    corpus = BuiltinCorpus(0, lexicon=lex)
    seen: dict[str, float] = {}
    for i in range(20_000):
        d = corpus.document(i)
        assert seen.setdefault(linear_text(d), d.logprob) == d.logprob
    assert len(seen) < 15_000  # many repeats, so the check above had work to do


def test_parser_rejects_documents_the_grammar_cannot_make():
    doc = next(d for d in BuiltinCorpus(0).documents() if " gave the " in d.text)
    m = re.search(r" gave the (\w+) (\w+) ", doc.text)
    recoloured = "black" if m[1] != "black" else "white"
    wrong = Document(doc.text.replace(m[0], f" gave the {recoloured} {m[2]} ", 1), doc.messages, doc.logprob)
    with pytest.raises(ParseError):
        parse_document(wrong)
    with pytest.raises(ParseError):
        parse_document(Document(doc.text + " The end.", doc.messages, doc.logprob))


# -- the entropy floor ------------------------------------------------------------------------
def test_sampler_draws_documents_with_the_probabilities_it_reports():
    exact = {linear_text(d.document): math.exp(d.logprob) for d in tree(WIDE)}
    n = 20_000
    sample = [BuiltinCorpus(5, lexicon=WIDE).document(i) for i in range(n)]
    counts = Counter(linear_text(d) for d in sample)
    assert all(math.exp(d.logprob) == pytest.approx(exact[linear_text(d)]) for d in sample[:2000])
    # Chi-square over documents expected >= 10 times, the rest pooled.
    big = [t for t, p in exact.items() if p * n >= 10]
    cells = [(counts[t], exact[t] * n) for t in big]
    cells.append((n - sum(counts[t] for t in big), n * (1 - sum(exact[t] for t in big))))
    chi2 = sum((o - e) ** 2 / e for o, e in cells)
    df = len(cells) - 1
    assert df > 50 and chi2 < df + 5 * math.sqrt(2 * df)
    # The mean surprisal is the entropy.
    nll = [-d.logprob for d in sample]
    mean = sum(nll) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in nll) / (n - 1))
    entropy = -sum(p * math.log(p) for p in exact.values())
    assert abs(mean - entropy) < 4 * sd / math.sqrt(n)


def test_entropy_floor_of_a_sample_matches_the_exact_floor_of_a_tiny_grammar():
    tok = get_tokenizer()
    derivations = tree(WIDE)
    text_ids = tok.encode_batch([d.document.text for d in derivations])
    lengths = [len(tokenize_document(tok, d.document, ids)) for d, ids in zip(derivations, text_ids, strict=True)]
    nats = math.fsum(-math.exp(d.logprob) * d.logprob for d in derivations)
    tokens = math.fsum(math.exp(d.logprob) * n for d, n in zip(derivations, lengths, strict=True))
    exact = nats / tokens
    sample = [BuiltinCorpus(9, lexicon=WIDE).document(i) for i in range(8000)]
    assert entropy_floor(sample, tok) == pytest.approx(exact, rel=0.02)
    few = sample[:3]
    assert entropy_floor(few, tok) == pytest.approx(
        -sum(d.logprob for d in few) / sum(len(tokenize_document(tok, d)) for d in few))


def test_entropy_floor_needs_documents_with_a_logprob():
    with pytest.raises(ValueError, match="logprob"):
        entropy_floor([Document(text="plain text")], get_tokenizer())
