"""A lexicon refuses words that would make the corpus ambiguous or its text malformed."""

from __future__ import annotations

import pytest

from tinyllm.data.builtin import Lexicon


@pytest.mark.parametrize("field, value, match", [
    ("nouns", ("ball", "balloon"), "prefix"),
    ("names", (("Then", "he"), ("Ann", "she")), "prefix"),
    ("nouns", ("apple", "ball"), "consonant"),
    ("utterances", ('Say "hi"',), "double quotes"),
    ("places", (), "empty"),
    ("appositive_weight", -1.0, "others >= 0"),
])
def test_lexicon_refuses_words_that_would_break_decoding(field, value, match):
    with pytest.raises(ValueError, match=match):
        Lexicon(**{field: value})
