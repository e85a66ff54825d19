"""The words and knobs of the builtin story grammar, kept apart from the generator that uses them.

Why it is shaped this way: the generator (`story`) is the grammar's logic; this
module is its data. A test builds a tiny `Lexicon` (two names, two places, short stories) whose
whole choice tree can be enumerated, and checks the generator on it; the default lexicon is the
same grammar with more words.

Unique decodability rests on two properties checked here, once, when a lexicon is built:
- every list the generator picks from is prefix-free as rendered (" red" is never a prefix of
  " reddish"), so the text after a choice always tells which option was taken;
- the words that can open a sentence (names, pronouns, connectives, the weather lead) are
  prefix-free together, since one pick chooses among all of them.
Words never contain a double quote, a newline or "<|", which mark dialogue, questions and the
chat template. Words that follow the article "a" (traits, nouns) start with a consonant, so the
article never depends on a later choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from tinyllm.data.builtin.tape import prefix_clash

PRONOUNS = ("she", "he")
# The lead of the weather sentence ("It was a sunny day."): it competes with subjects in one pick.
WEATHER_LEAD = "It was a"
# Event names, in the order the generator offers them; `Lexicon.events` gives each a weight.
EVENTS = (
    "go", "go_with", "find", "have", "give", "leave", "pick_up", "meet",
    "felt", "was_very", "said", "shouted", "look", "still",
)
# Events available to every character in every state: one must have weight, or a subject could
# be picked with nothing to do.
ALWAYS_AVAILABLE = ("felt", "was_very", "said", "shouted")


def _default_events() -> dict[str, float]:
    return {
        "go": 3.0, "go_with": 1.0, "find": 3.0, "have": 1.0, "give": 3.0, "leave": 1.5,
        "pick_up": 2.0, "meet": 2.0, "felt": 1.0, "was_very": 0.7, "said": 1.2, "shouted": 0.5,
        # These two restate a fact (a colour, a feeling) so the story practises recalling it.
        "look": 3.0, "still": 2.5,
    }


@dataclass(frozen=True)
class Lexicon:
    """Word lists and structure knobs of the story grammar. Validated on construction."""

    openings: tuple[str, ...] = (
        "Once upon a time,", "One day,", "Long ago,", "One morning,", "In a small town,",
    )
    traits: tuple[str, ...] = (
        "little", "happy", "brave", "kind", "shy", "small", "big", "funny", "clever", "gentle",
        "tiny", "friendly", "quiet", "silly",
    )
    # (kind, pronoun its name must have, or None for any name)
    kinds: tuple[tuple[str, str | None], ...] = (
        ("girl", "she"), ("boy", "he"), ("dog", None), ("cat", None), ("bunny", None),
        ("bear", None), ("bird", None), ("frog", None), ("duck", None), ("mouse", None),
    )
    # (name, pronoun)
    names: tuple[tuple[str, str], ...] = (
        ("Mia", "she"), ("Lily", "she"), ("Emma", "she"), ("Sara", "she"), ("Anna", "she"),
        ("Lucy", "she"), ("Amy", "she"), ("Zoe", "she"), ("Ruby", "she"), ("Ella", "she"),
        ("Rose", "she"), ("Kate", "she"), ("Tom", "he"), ("Ben", "he"), ("Max", "he"),
        ("Sam", "he"), ("Leo", "he"), ("Jack", "he"), ("Tim", "he"), ("Bob", "he"),
        ("Dan", "he"), ("Noah", "he"), ("Luke", "he"), ("Finn", "he"),
    )
    colours: tuple[str, ...] = (
        "red", "blue", "green", "yellow", "pink", "purple", "brown", "black", "white", "grey",
    )
    nouns: tuple[str, ...] = (
        "kite", "ball", "hat", "box", "book", "cup", "drum", "boat", "doll", "bag", "bike",
        "shoe", "key", "ring", "bell", "shell", "rock", "coin", "spoon", "flower",
    )
    # (preposition, place): "found a kite in the park", "Where is Tom?" -> "At the beach."
    places: tuple[tuple[str, str], ...] = (
        ("in", "park"), ("in", "garden"), ("in", "forest"), ("at", "beach"), ("by", "lake"),
        ("in", "kitchen"), ("at", "school"), ("on", "hill"), ("on", "farm"), ("by", "river"),
        ("in", "yard"), ("at", "zoo"),
    )
    feelings: tuple[str, ...] = (
        "happy", "sad", "excited", "tired", "scared", "proud", "hungry", "calm", "glad", "lonely",
    )
    weathers: tuple[str, ...] = ("sunny", "rainy", "windy", "cold", "warm", "snowy", "cloudy", "hot")
    utterances: tuple[str, ...] = (
        "Let us play!", "I am so happy!", "What a nice day!", "Look at this!", "I love it here!",
        "Come with me!", "This is fun!", "I am hungry.", "Can we go home?", "Wait for me!",
        "Hello, friend!", "Thank you!",
    )
    connectives: tuple[str, ...] = ("Then", "Later,", "After that,", "Soon,")
    events: Mapping[str, float] = field(default_factory=_default_events)

    # A named subject is described again (", the little dog,") with this weight against its events'.
    appositive_weight: float = 2.0
    # Sentence-start weights: each character's name, the previous subject's pronoun, each
    # connective, the weather sentence.
    name_weight: float = 1.0
    pronoun_weight: float = 1.0
    connective_weight: float = 0.2
    weather_weight: float = 0.3

    # Story length in sentences, the intro included: at least `min_sentences`; after that each
    # sentence ends the story with `stop_prob`; never more than `max_sentences`.
    min_sentences: int = 4
    max_sentences: int = 14
    stop_prob: float = 0.2
    max_characters: int = 4
    max_objects: int = 5

    # Share of stories followed by questions; after each answer another question follows with
    # `more_question_prob`, at most `max_questions`, never the same question twice.
    qa_share: float = 0.5
    more_question_prob: float = 0.5
    max_questions: int = 3

    def __post_init__(self) -> None:
        # Read-only, so a compiled grammar cached for this lexicon can never go stale.
        object.__setattr__(self, "events", MappingProxyType(dict(self.events)))
        _check_lexicon(self)

    # Frozen, but with a mapping field: hash by value so a Lexicon can key a cache.
    def __hash__(self) -> int:
        return hash(self.key())

    def key(self) -> tuple:
        """Every field as a hashable tuple: equal keys, equal grammars."""
        return tuple(
            tuple(sorted(v.items())) if isinstance(v, Mapping) else v
            for v in (getattr(self, f) for f in self.__dataclass_fields__)
        )


def _check_lexicon(lex: Lexicon) -> None:
    words = {
        "openings": lex.openings, "traits": lex.traits, "kinds": [k for k, _ in lex.kinds],
        "names": [n for n, _ in lex.names], "colours": lex.colours, "nouns": lex.nouns,
        "places": [p for _, p in lex.places], "feelings": lex.feelings,
        "weathers": lex.weathers, "utterances": lex.utterances, "connectives": lex.connectives,
    }
    for name, items in words.items():
        if not items and name != "connectives":
            raise ValueError(f"Lexicon.{name} is empty: give it at least one word")
        for w in items:
            if not w or w != w.strip() or any(bad in w for bad in ('"', "\n", "<|")):
                raise ValueError(f"Lexicon.{name} has {w!r}: words are non-empty, trimmed, "
                                 "without double quotes, newlines or '<|'")
        _check_prefix_free(f"Lexicon.{name}", items)
    for name in ("traits", "nouns"):
        for w in words[name]:
            if w[0].lower() in "aeiou":
                raise ValueError(f"Lexicon.{name} has {w!r}: it follows the article 'a', so it "
                                 "must start with a consonant")
    openers = [n for n, _ in lex.names] + [p.capitalize() for p in PRONOUNS]
    _check_prefix_free("sentence openers (names, pronouns, connectives, weather)",
                       openers + list(lex.connectives) + [WEATHER_LEAD])
    for name, pronoun in lex.names:
        if pronoun not in PRONOUNS:
            raise ValueError(f"Lexicon.names: {name!r} has pronoun {pronoun!r}, not one of {PRONOUNS}")
    for kind, pronoun in lex.kinds:
        if pronoun is not None and not any(p == pronoun for _, p in lex.names):
            raise ValueError(f"Lexicon.kinds: {kind!r} needs a name with pronoun {pronoun!r}")
    if set(lex.events) != set(EVENTS) or any(w < 0 for w in lex.events.values()):
        raise ValueError(f"Lexicon.events must give a weight >= 0 to exactly {EVENTS}")
    if not any(lex.events[e] > 0 for e in ALWAYS_AVAILABLE):
        raise ValueError(f"Lexicon.events: one of {ALWAYS_AVAILABLE} needs a positive weight")
    if min(lex.name_weight, lex.pronoun_weight) <= 0 or min(lex.connective_weight, lex.weather_weight,
                                                             lex.appositive_weight) < 0:
        raise ValueError("Lexicon: name and pronoun weights must be > 0, others >= 0")
    if not 1 <= lex.min_sentences <= lex.max_sentences:
        raise ValueError("Lexicon: need 1 <= min_sentences <= max_sentences")
    if lex.max_characters < 1 or lex.max_objects < 0 or lex.max_questions < 1:
        raise ValueError("Lexicon: need max_characters >= 1, max_objects >= 0, max_questions >= 1")
    for name in ("stop_prob", "more_question_prob", "qa_share"):
        if not 0.0 <= getattr(lex, name) <= 1.0:
            raise ValueError(f"Lexicon.{name} must be a probability in [0, 1]")
    if lex.min_sentences < lex.max_sentences and not 0.0 < lex.stop_prob < 1.0:
        raise ValueError("Lexicon.stop_prob must be in (0, 1) when story lengths vary")


def _check_prefix_free(what: str, items) -> None:
    clash = prefix_clash(items)
    if clash:
        raise ValueError(f"{what}: {clash[0]!r} is a prefix of {clash[1]!r} (or a duplicate), so "
                         "the text could not tell them apart")


DEFAULT_LEXICON = Lexicon()
# The corpus chat fine-tuning reads (`data.builtin_questions = "every"`): every story followed by
# every question it settles, up to 12, so each forward over a story trains several answers. On the
# default pipeline's pretrained model it answered more held-out questions than the sampled corpus's
# 1 to 3 per asked story (README: Chat fine-tuning).
EVERY_QUESTION = replace(DEFAULT_LEXICON, qa_share=1.0, more_question_prob=1.0, max_questions=12)
# `data.builtin_questions` -> the lexicon of that corpus.
QUESTION_LEXICONS = {"sampled": DEFAULT_LEXICON, "every": EVERY_QUESTION}
