"""The story grammar: it reaches every kind of sentence and question, and every answer follows from the story."""

from __future__ import annotations

import re
from collections import Counter

from tinyllm.data.builtin import DEFAULT_LEXICON, BuiltinCorpus, linear_text

from .conftest import PLOT, WIDE, tree


def test_tiny_grammars_reach_every_kind_of_sentence_and_question():
    text = "\n".join(linear_text(d.document) for d in tree(WIDE) + tree(PLOT))
    for phrase in ("Then she", "It was a cold day.", "He and", ' said, "Hi!"', ' shouted, "',
                   " was very sad.", " felt sad.", " found a ", " had a ", " gave the ",
                   " left the ", " picked up the ", " met a ", " went to the ", "Ann, the shy girl, ",
                   " looked at the kite. It was red.", " was still sad.", "Who is ",
                   "Where is ", "How does ", "What colour is ", "Who has ", "Where did ",
                   "What did ", "<|im_start|>user\nWho is Ann?<|im_end|>\n<|im_start|>assistant\n"
                   "A shy girl.<|im_end|>\n<|im_start|>user\n"):
        assert phrase in text, phrase


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
        self.seen: str | None = None  # the object whose colour the next sentence gives
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
            if m := re.fullmatch(r"It was (\w+)\.", s):  # after "X found a kite ..." or "X looked at the kite."
                assert self.seen is not None, s
                o = self.objs[self.seen]
                assert o["colour"] in (None, m[1]), s  # a first sight sets it, a look restates it
                o["colour"], self.seen = m[1], None
                continue
            assert self.seen is None, f"no colour given for the {self.seen}"
            s = re.sub(r"^(Then|Later,|After that,|Soon,) ", "", s)
            who, rest = s.split(" ", 1)
            if who.lower() in ("she", "he"):
                assert last is not None and _PRONOUN[last] == who.lower(), s
                who = last
            elif m := re.fullmatch(r"(\w+), the (\w+) (\w+), (.+)", s):  # described again
                who, rest = m[1], m[4]
                assert (self.chars[who]["trait"], self.chars[who]["kind"]) == (m[2], m[3]), s
            self._event(who, rest)
            last = who
        assert self.seen is None, f"no colour given for the {self.seen}"

    def _event(self, who: str, rest: str) -> None:
        c = self.chars[who]
        if m := re.fullmatch(r"(?:and (\w+) )?went to the (\w+)\.", rest):
            assert m[2] != c["place"]
            c["place"] = m[2]
            if m[1]:
                self.chars[m[1]]["place"] = m[2]
        elif m := re.fullmatch(r"(found|had) a (\w+)(?: (\w+) the (\w+))?\.", rest):
            assert m[2] not in self.objs
            if m[1] == "found":  # found where they are
                assert (m[3], m[4]) == (_PREP[c["place"]], c["place"])
            self.objs[m[2]] = {"colour": None, "holder": who, "place": None,
                               "found": (who, m[4]) if m[1] == "found" else None}
            self.seen = m[2]
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
        elif m := re.fullmatch(r"was still (\w+)\.", rest):
            assert c["feeling"] == m[1]
        elif m := re.fullmatch(r"looked at the (\w+)\.", rest):
            o = self.objs[m[1]]
            assert o["holder"] == who or (o["holder"] is None and o["place"] == c["place"])
            self.seen = m[1]
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
