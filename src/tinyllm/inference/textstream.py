"""Token ids to streamable text: whole characters only, and nothing at or after a stop string.

Every surface that prints a model's text as it is generated reads it through here: `tinyllm
sample` and the chat REPL (`stream_text`) and the server (`TextStream` with the request's stops).

Why it is shaped this way:
- A GPT-2 token is a run of bytes, and one character can span tokens (most emoji and CJK do).
  Decoding each token on its own would send broken characters, so bytes go through an incremental
  UTF-8 decoder that holds an incomplete character until its last byte arrives.
- A stop string can also span tokens, and the client must never see any part of it. So text that
  could be the start of a stop string is held back until the next token shows whether it is one.
  Held text is always a suffix that is a prefix of some stop string, so a stop string can never
  straddle what was sent and what is held.
- Special ids are markup, not text: they add nothing (`Tokenizer.text_bytes`). Generation stops
  at them anyway (`STOP_IDS`); this keeps a client from ever reading `<|im_start|>` as content.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator, Sequence

from tinyllm.tokenizer import Tokenizer


class TextStream:
    """Feed token ids with `push`; it returns the text that is safe to send so far."""

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str] = ()) -> None:
        if any(not s for s in stop_strings):
            raise ValueError("stop strings must be non-empty")
        self._tokenizer = tokenizer
        self._stops = tuple(stop_strings)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded, not yet sent: possibly the start of a stop string
        self.stopped = False  # a stop string was found; nothing more will be returned

    def push(self, token_id: int) -> str:
        """Add one token; return the newly sendable text (possibly empty)."""
        if self.stopped:
            return ""
        self._held += self._utf8.decode(self._tokenizer.text_bytes([token_id]))
        return self._release()

    def flush(self) -> str:
        """End of generation: return everything still held (a partial character becomes U+FFFD)."""
        if self.stopped:
            return ""
        self._held += self._utf8.decode(b"", final=True)
        out = self._release()
        if not self.stopped:  # what is left can no longer become a stop string
            out, self._held = out + self._held, ""
        return out

    def _release(self) -> str:
        cut = min((i for i in (self._held.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._held = self._held[:cut], ""
            return out
        keep = self._stop_prefix_length()
        out = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep :]
        return out

    def _stop_prefix_length(self) -> int:
        """Length of the longest suffix of the held text that begins some stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._held)), best, -1):
                if self._held.endswith(stop[:n]):
                    best = n
                    break
        return best


def stream_text(tokenizer: Tokenizer, ids: Iterable[int]) -> Iterator[str]:
    """Text pieces as `ids` arrive, each non-empty; a character split across tokens comes whole."""
    stream = TextStream(tokenizer)
    for i in ids:
        piece = stream.push(i)
        if piece:
            yield piece
    tail = stream.flush()
    if tail:
        yield tail
