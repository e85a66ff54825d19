"""The builtin corpus: simple English stories, generated offline, with questions about each story.

Why it is a package: the corpus is a grammar's data (`lexicon`), the grammar itself (`story`), the
tapes its random choices go through (`tape`), and the corpus built on them (`corpus`: document i,
identity, entropy floor, parse). Each part is tested on its own; users need only the names here.

- A story is a small world (characters with places and feelings, objects with colours and
  holders) changed by one event per sentence: "Mia went to the park. She found a red kite in the
  park. Mia gave the red kite to Tom." Some words repeat a fact the model must carry ("the *red*
  kite", "in the *park*"), which is what makes the corpus worth learning beyond its grammar.
- After a share of the stories, ChatML questions follow ("Who has the kite?" -> "Tom."). Each
  question is built from the final world state, so its answer is fixed by the story.
- Every choice is written as prefix-free text, so a document decodes to exactly one choice
  sequence and its log-probability is exact: the corpus knows its own entropy floor.
"""

from tinyllm.data.builtin.corpus import (
    VERSION,
    BuiltinCorpus,
    Derivation,
    entropy_floor,
    enumerate_documents,
    linear_text,
    parse_document,
)
from tinyllm.data.builtin.lexicon import DEFAULT_LEXICON, QUESTION_LEXICONS, Lexicon
from tinyllm.data.builtin.tape import AmbiguityError, ParseError

__all__ = [
    "DEFAULT_LEXICON", "VERSION", "AmbiguityError", "BuiltinCorpus", "Derivation", "Lexicon",
    "ParseError", "QUESTION_LEXICONS", "entropy_floor", "enumerate_documents", "linear_text", "parse_document",
]
