"""The builtin corpus: deterministic, uniquely decodable, an exact entropy floor, answers fixed by the story.

Two tiny lexicons have choice trees small enough to enumerate completely (~40k documents each):
WIDE uses every kind of sentence over short stories, PLOT has long enough stories for objects
to be found, given, left and picked up again.
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
    VERSION,
    BuiltinCorpus,
    entropy_floor,
    enumerate_documents,
    linear_text,
    parse_document,
)
from tinyllm.data.builtin_lexicon import DEFAULT_LEXICON, Lexicon
from tinyllm.data.builtin_tape import AmbiguityError, ParseError, ParseTape
from tinyllm.data.document import Document, tokenize_document
from tinyllm.tokenizer import get_tokenizer

_SMALL = dict(
    openings=("One day,",), traits=("shy",), names=(("Ann", "she"), ("Bob", "he")),
    places=(("in", "park"), ("at", "beach")), feelings=("sad",), weathers=("cold",),
    utterances=("Hi!",), min_sentences=1, max_characters=2, max_objects=1,
)
WIDE = Lexicon(
    **_SMALL, kinds=(("girl", "she"), ("dog", None)), colours=("red", "blue"), nouns=("kite", "cup"),
    connectives=("Then",), max_sentences=3, max_questions=2,
)
_PLOT_EVENTS = {**DEFAULT_LEXICON.events, "was_very": 0.0, "said": 0.0, "shouted": 0.0,
                "go_with": 0.0, "have": 0.0}
PLOT = Lexicon(
    **{**_SMALL, "names": (("Ann", "she"), ("Bea", "she"))}, kinds=(("girl", "she"),),
    colours=("red",), nouns=("kite",), connectives=(), weather_weight=0.0, events=_PLOT_EVENTS,
    max_sentences=5, max_questions=1,
)
TREES: dict[Lexicon, list] = {}


def tree(lex: Lexicon) -> list:
    """Every derivation of a tiny lexicon, computed once per test session."""
    if lex not in TREES:
        TREES[lex] = list(enumerate_documents(lex))
    return TREES[lex]


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


def test_tiny_grammars_reach_every_kind_of_sentence_and_question():
    text = "\n".join(linear_text(d.document) for d in tree(WIDE) + tree(PLOT))
    for phrase in ("Then she", "It was a cold day.", "He and", ' said, "Hi!"', ' shouted, "',
                   " was very sad.", " felt sad.", " found a ", " had a ", " gave the ",
                   " left the ", " picked up the ", " met a ", " went to the ", "Who is ",
                   "Where is ", "How does ", "What colour is ", "Who has ", "Where did ",
                   "What did ", "<|im_start|>user\nWho is Ann?<|im_end|>\n<|im_start|>assistant\n"
                   "A shy girl.<|im_end|>\n<|im_start|>user\n"):
        assert phrase in text, phrase


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


def test_parse_tape_refuses_options_that_are_not_prefix_free():
    with pytest.raises(AmbiguityError):
        ParseTape("ball.").uniform([" ball", "ball", "balloon"])
    assert ParseTape("ball.").uniform(["box", "ball"]) == 1


@pytest.mark.parametrize("field, value, match", [
    ("nouns", ("ball", "balloon"), "prefix"),
    ("names", (("Then", "he"), ("Ann", "she")), "prefix"),
    ("colours", ("orange", "red"), "consonant"),
    ("utterances", ('Say "hi"',), "double quotes"),
    ("places", (), "empty"),
])
def test_lexicon_refuses_words_that_would_break_decoding(field, value, match):
    with pytest.raises(ValueError, match=match):
        Lexicon(**{field: value})


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


# -- answers come from the story --------------------------------------------------------------
_SENTENCE = re.compile(r'[^".]+(?:"[^"]*"|\.)')
_PREP = {place: prep for prep, place in DEFAULT_LEXICON.places}
_PRONOUN = dict(DEFAULT_LEXICON.names)


class StoryFacts:
    """What a reader learns from a story's text alone, checked for consistency as it reads."""

    def __init__(self, text: str) -> None:
        self.chars: dict[str, dict] = {}
        self.objs: dict[str, dict] = {}
        self.gifts: list[tuple[str, str, str]] = []
        sentences = [s.strip() for s in _SENTENCE.findall(text)]
        assert " ".join(sentences) == text.strip()
        last = None
        for s in sentences:
            if m := re.fullmatch(r"[^.]+, there was a (\w+) (\w+) named (\w+)\.", s):
                self.chars[m[3]] = {"trait": m[1], "kind": m[2], "place": None, "feeling": None}
                last = m[3]
                continue
            if re.fullmatch(r"It was a \w+ day\.", s):
                last = None
                continue
            s = re.sub(r"^(Then|Later,|After that,|Soon,) ", "", s)
            who, rest = s.split(" ", 1)
            if who.lower() in ("she", "he"):
                assert last is not None and _PRONOUN[last] == who.lower(), s
                who = last
            self._event(who, rest)
            last = who

    def _event(self, who: str, rest: str) -> None:
        c = self.chars[who]
        if m := re.fullmatch(r"(?:and (\w+) )?went to the (\w+)\.", rest):
            assert m[2] != c["place"]
            c["place"] = m[2]
            if m[1]:
                self.chars[m[1]]["place"] = m[2]
        elif m := re.fullmatch(r"(found|had) a (\w+) (\w+)(?: (\w+) the (\w+))?\.", rest):
            assert m[3] not in self.objs
            if m[1] == "found":  # found where they are
                assert (m[4], m[5]) == (_PREP[c["place"]], c["place"])
            self.objs[m[3]] = {"colour": m[2], "holder": who, "place": None,
                               "found": (who, m[5]) if m[1] == "found" else None}
        elif m := re.fullmatch(r"(gave|left|picked up) the (\w+) (\w+)(?: to (\w+)| (\w+) the (\w+))?\.", rest):
            o = self.objs[m[3]]
            assert o["colour"] == m[2]  # the colour is carried from where the object appeared
            if m[1] == "picked up":
                assert o["holder"] is None and o["place"] == c["place"]
                o["holder"], o["place"] = who, None
                return
            assert o["holder"] == who
            if m[1] == "gave":
                assert self.chars[m[4]]["place"] == c["place"] and m[4] != who
                o["holder"] = m[4]
                self.gifts.append((who, m[4], m[3]))
            else:
                assert (m[5], m[6]) == (_PREP[c["place"]], c["place"])
                o["holder"], o["place"] = None, m[6]
        elif m := re.fullmatch(r"met a (\w+) (\w+) named (\w+)\.", rest):
            assert m[3] not in self.chars
            self.chars[m[3]] = {"trait": m[1], "kind": m[2], "place": c["place"], "feeling": None}
        elif m := re.fullmatch(r"(?:felt|was very) (\w+)\.", rest):
            c["feeling"] = m[1]
        else:
            assert re.fullmatch(r'(said|shouted), "[^"]+"', rest), rest

    def answer(self, q: str) -> str:
        at = lambda place: f"{_PREP[place].capitalize()} the {place}."  # noqa: E731
        if m := re.fullmatch(r"Who is (\w+)\?", q):
            return f"A {self.chars[m[1]]['trait']} {self.chars[m[1]]['kind']}."
        if m := re.fullmatch(r"Where is (\w+)\?", q):
            return at(self.chars[m[1]]["place"])
        if m := re.fullmatch(r"Where is the (\w+)\?", q):
            assert self.objs[m[1]]["holder"] is None
            return at(self.objs[m[1]]["place"])
        if m := re.fullmatch(r"How does (\w+) feel\?", q):
            return f"{m[1]} feels {self.chars[m[1]]['feeling']}."  # the story's own " glad", not "Glad"
        if m := re.fullmatch(r"What colour is the (\w+)\?", q):
            return f"The {m[1]} is {self.objs[m[1]]['colour']}."
        if m := re.fullmatch(r"Who has the (\w+)\?", q):
            return self.objs[m[1]]["holder"] + "."
        if m := re.fullmatch(r"Where did (\w+) find the (\w+)\?", q):
            finder, place = self.objs[m[2]]["found"]
            assert finder == m[1]
            return at(place)
        m = re.fullmatch(r"What did (\w+) give to (\w+)\?", q)
        gifts = [noun for giver, to, noun in self.gifts if (giver, to) == (m[1], m[2])]
        assert len(gifts) == 1
        return f"The {self.objs[gifts[0]]['colour']} {gifts[0]}."


def test_every_answer_follows_from_the_story_text():
    corpus = BuiltinCorpus(2)
    docs = [corpus.document(i) for i in range(3000)]
    asked = Counter()
    for d in docs:
        facts = StoryFacts(d.text)  # also checks every story is consistent with itself
        turns = d.messages or ()
        for q, a in zip(turns[::2], turns[1::2], strict=True):
            assert a["content"] == facts.answer(q["content"]), (d.text, q["content"])
            words = q["content"][:-1].split()
            asked[" ".join("N" if w in facts.chars else "O" if w in facts.objs else w for w in words)] += 1
    assert len(asked) == 8  # every kind of question was asked and checked
