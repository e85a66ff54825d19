"""Choice tapes: where the builtin story generator makes, replays or reads back every random choice.

Why it is shaped this way: the generator never touches `random`. It asks a tape to pick one of
several texts, and the tape both decides and writes the chosen text; fixed text goes through
`say`. So the tape sees the whole document as a sequence of (choice, text) steps, and three tapes
give three uses of the one generator:
- `SampleTape` draws from a `random.Random` and sums the log-probability of each draw: the fast
  path that makes the corpus;
- `ReplayTape` follows a given prefix of choices, then always takes option 0, recording how many
  options each pick offered: `enumerate_choices` walks a whole choice tree with it;
- `ParseTape` reads a target text and, at each pick, takes the option the text goes on with. It
  also checks that the options are prefix-free. Two choice sequences that give the same text agree
  up to their first difference, where they face the same options; prefix-free options cannot both
  be followed by the same text. So a parse that passes the check proves its document has exactly
  one choice sequence, and its log-probability is exact.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate, pairwise
from typing import TypeVar

T = TypeVar("T")
# -log(n) for the uniform picks the generator makes over short dynamic lists.
_NEG_LOG = [0.0] + [-math.log(n) for n in range(1, 257)]


def prefix_clash(texts: Sequence[str]) -> tuple[str, str] | None:
    """Two texts where the first is a prefix of (or equal to) the second, or None if prefix-free."""
    # Sorted, a prefix sits right before the first text it prefixes: adjacent pairs suffice.
    for a, b in pairwise(sorted(texts)):
        if b.startswith(a):
            return a, b
    return None


class Choice:
    """A fixed pick: option texts with positive weights, their normalised log-probabilities precomputed."""

    __slots__ = ("texts", "n", "cum", "total", "logps", "uniform")

    def __init__(self, texts: Sequence[str], weights: Sequence[float] | None = None) -> None:
        if not texts:
            raise ValueError("a Choice needs at least one option")
        weights = [1.0] * len(texts) if weights is None else list(weights)
        if len(weights) != len(texts) or min(weights) <= 0:
            raise ValueError("a Choice needs one positive weight per option")
        self.texts = list(texts)
        self.n = len(texts)
        self.cum = list(accumulate(weights))
        self.total = self.cum[-1]
        self.logps = [math.log(w / self.total) for w in weights]
        self.uniform = len(set(weights)) == 1


class Tape:
    """What the generator writes to. `parts` concatenated is the document's linear text."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.logprob = 0.0

    def say(self, text: str) -> None:
        """Write text that no choice decides."""
        self.parts.append(text)

    def pick(self, choice: Choice) -> int:
        """Choose among a fixed `Choice`, write the chosen text, return its index."""
        raise NotImplementedError

    def uniform(self, texts: Sequence[str]) -> int:
        """Choose uniformly among `texts`, write the chosen one, return its index."""
        raise NotImplementedError

    def weighted(self, texts: Sequence[str], weights: Sequence[float]) -> int:
        """Choose among `texts` with probability proportional to `weights` (all > 0)."""
        raise NotImplementedError


class SampleTape(Tape):
    """Draws every choice from `rng`; the fast path (a story makes ~40 picks)."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self._random = rng.random

    def pick(self, choice: Choice) -> int:
        if choice.uniform:
            i = int(self._random() * choice.n)
        else:
            # min(): r * total can round up to total itself.
            i = min(bisect_right(choice.cum, self._random() * choice.total), choice.n - 1)
        self.logprob += choice.logps[i]
        self.parts.append(choice.texts[i])
        return i

    def uniform(self, texts: Sequence[str]) -> int:
        n = len(texts)
        i = int(self._random() * n)
        self.logprob += _NEG_LOG[n] if n <= 256 else -math.log(n)
        self.parts.append(texts[i])
        return i

    def weighted(self, texts: Sequence[str], weights: Sequence[float]) -> int:
        total = sum(weights)
        x = self._random() * total
        last = len(weights) - 1
        i = 0
        while i < last and x >= weights[i]:
            x -= weights[i]
            i += 1
        self.logprob += math.log(weights[i] / total)
        self.parts.append(texts[i])
        return i


class _Recording(Tape):
    """A tape that decides by index alone and records each pick's choice and option count."""

    def __init__(self) -> None:
        super().__init__()
        self.choices: list[int] = []
        self.sizes: list[int] = []

    def _decide(self, texts: Sequence[str]) -> int:
        raise NotImplementedError

    def _take(self, texts: Sequence[str], logp: float, i: int) -> int:
        self.choices.append(i)
        self.sizes.append(len(texts))
        self.logprob += logp
        self.parts.append(texts[i])
        return i

    def pick(self, choice: Choice) -> int:
        i = self._decide(choice.texts)
        return self._take(choice.texts, choice.logps[i], i)

    def uniform(self, texts: Sequence[str]) -> int:
        i = self._decide(texts)
        return self._take(texts, -math.log(len(texts)), i)

    def weighted(self, texts: Sequence[str], weights: Sequence[float]) -> int:
        i = self._decide(texts)
        return self._take(texts, math.log(weights[i] / sum(weights)), i)


class ReplayTape(_Recording):
    """Takes `prefix[k]` at the k-th pick, option 0 after the prefix runs out."""

    def __init__(self, prefix: Sequence[int] = ()) -> None:
        super().__init__()
        self._prefix = prefix

    def _decide(self, texts: Sequence[str]) -> int:
        k = len(self.choices)
        return self._prefix[k] if k < len(self._prefix) else 0


class ParseError(ValueError):
    """The target text is not a document the generator can make."""


class AmbiguityError(ValueError):
    """A pick offered options where one is a prefix of another: the text may not decode uniquely."""


class ParseTape(_Recording):
    """Recovers the choice sequence of `target` (a document's linear text), checking prefix-freeness."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self.pos = 0

    def say(self, text: str) -> None:
        if not self.target.startswith(text, self.pos):
            raise ParseError(f"expected {text!r} at offset {self.pos}: {self._context()}")
        self.pos += len(text)
        self.parts.append(text)

    def _decide(self, texts: Sequence[str]) -> int:
        clash = prefix_clash(texts)
        if clash:
            raise AmbiguityError(f"options {clash[0]!r} and {clash[1]!r} at offset {self.pos}: "
                                 f"{self._context()}")
        for i, t in enumerate(texts):
            if self.target.startswith(t, self.pos):
                self.pos += len(t)
                return i
        raise ParseError(f"none of {list(texts)!r} at offset {self.pos}: {self._context()}")

    def _context(self) -> str:
        return repr(self.target[max(0, self.pos - 30): self.pos + 30])


def enumerate_choices(run: Callable[[Tape], T]) -> Iterator[tuple[T, ReplayTape]]:
    """Every outcome of `run` over its whole choice tree, depth first, with the tape that made it.

    `run` must depend on nothing but the tape's choices. Each leaf is reached by replaying its
    choice prefix from the start: simple, and fast enough for the tiny grammars this is for.
    """
    prefix: list[int] = []
    while True:
        tape = ReplayTape(prefix)
        yield run(tape), tape
        # Next leaf: bump the deepest pick that still has an untried option.
        for k in range(len(tape.choices) - 1, -1, -1):
            if tape.choices[k] + 1 < tape.sizes[k]:
                prefix = tape.choices[:k] + [tape.choices[k] + 1]
                break
        else:
            return
