"""Two tiny lexicons whose choice trees are small enough to enumerate completely (~40k documents each).

WIDE uses every kind of sentence over short stories; PLOT has long enough stories for objects to be
found, given, left and picked up again.
"""

from __future__ import annotations

from tinyllm.data.builtin import DEFAULT_LEXICON, Lexicon, enumerate_documents

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
                "go_with": 0.0, "have": 0.0, "look": 0.0, "still": 0.0}
PLOT = Lexicon(
    **{**_SMALL, "names": (("Ann", "she"), ("Bea", "she"))}, kinds=(("girl", "she"),),
    colours=("red",), nouns=("kite",), connectives=(), weather_weight=0.0, appositive_weight=0.0,
    events=_PLOT_EVENTS,
    max_sentences=5, max_questions=1,
)
TREES: dict[Lexicon, list] = {}


def tree(lex: Lexicon) -> list:
    """Every derivation of a tiny lexicon, computed once per test session."""
    if lex not in TREES:
        TREES[lex] = list(enumerate_documents(lex))
    return TREES[lex]
