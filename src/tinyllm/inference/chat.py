"""A conversation with a chat model: its history, fitting it to the context, streamed answers.

Why it is shaped this way:
- The history is kept as text messages (an optional system message, then user and assistant
  turns) and rendered with the tokenizer's ChatML template for every answer, so the model always
  sees the layout it was fine-tuned on, and what the user typed can never become a special token.
  The prompt is the tokenizer's `prompt_ids`, the one every surface (sample, serve, the QA
  evaluation, the exported tokenizer) uses, so a conversation gets the same ids everywhere.
- The context is finite, so before each answer `fit_history` drops the oldest turns (a user
  message with the replies to it) until the prompt leaves room for the answer; the system
  message always stays. Room for the answer is `max_new_tokens`, at most half the context, so a
  long conversation keeps some memory even when a long answer is allowed. It is a pure function
  of the messages, tested on its own; dropped turns are gone for good, so the REPL can say so.
- `reply` is a generator of text pieces, so the caller prints the answer as it is generated and
  stops it by closing the generator (Ctrl-C). The answer enters the history when the generator
  ends for any reason, a stopped one too: the next turn sees what the user saw.
- Token ids are decoded as a UTF-8 stream (`textstream`), so a character split across tokens is
  printed whole.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch import nn

from tinyllm.errors import UserError
from tinyllm.inference.sampling import SEED_MAX, check_sampling_args, check_seed, generate
from tinyllm.inference.textstream import stream_text
from tinyllm.tokenizer import STOP_IDS, Tokenizer

__all__ = ["STOP_IDS", "ChatSession", "fit_history", "prompt_ids"]  # STOP_IDS: an answer's end


def prompt_ids(tokenizer: Tokenizer, messages: Sequence[dict]) -> list[int]:
    """The ids the model continues to answer the last message (`Tokenizer.prompt_ids`)."""
    return tokenizer.prompt_ids(messages=messages)


def fit_history(tokenizer: Tokenizer, messages: Sequence[dict], budget: int) -> list[dict]:
    """`messages` with the oldest turns dropped until `prompt_ids` has at most `budget` ids.

    A turn is a user message and the messages after it up to the next user message. A leading
    system message and the last turn (the question being asked) are always kept; raises
    UserError when those alone do not fit.
    """
    messages = list(messages)
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = _split_turns(messages[len(head):])
    while len(turns) > 1 and len(prompt_ids(tokenizer, head + _join(turns))) > budget:
        turns.pop(0)
    kept = head + _join(turns)
    size = len(prompt_ids(tokenizer, kept))
    if size > budget:
        what = "the system message and your message take" if head else "your message takes"
        raise UserError(f"{what} {size} tokens with the chat markup, but at most {budget} fit "
                        "(the context less the room kept for the answer): write less, or lower --max-new-tokens")
    return kept


def _split_turns(messages: list[dict]) -> list[list[dict]]:
    turns: list[list[dict]] = []
    for m in messages:
        if m["role"] == "user" or not turns:
            turns.append([])
        turns[-1].append(m)
    return turns


def _join(turns: list[list[dict]]) -> list[dict]:
    return [m for turn in turns for m in turn]


class ChatSession:
    """One conversation with `model`: ask with `reply(text)`, forget with `reset()`."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        *,
        system: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.8,
        top_k: int | None = 50,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> None:
        check_sampling_args(temperature, top_k, top_p)
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens (--max-new-tokens) must be at least 1, got {max_new_tokens}")
        self.model, self.tokenizer = model, tokenizer
        self.system = system or None
        self.max_new_tokens = max_new_tokens
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        check_seed(seed)  # here, not at the first answer
        self.seed = seed
        self.context = model.config.block_size
        self.answer_room = min(max_new_tokens, self.context // 2)
        self.messages: list[dict] = []
        self.turns_answered = 0
        self.dropped = 0  # messages the last `reply` dropped to fit the context
        self.reset()

    def reset(self) -> None:
        """Forget the conversation; the system message stays."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str) -> Iterator[str]:
        """Ask `text`; yields the answer's text as it is generated.

        The history is fitted to the context first (see `dropped`); a message that cannot fit
        raises UserError before anything is generated, and leaves the history unchanged. The
        answer is recorded when the generator finishes or is closed.
        """
        asked = [*self.messages, {"role": "user", "content": text}]
        fitted = fit_history(self.tokenizer, asked, self.context - self.answer_room)
        self.dropped = len(asked) - len(fitted)
        self.messages = fitted
        # Wrapped as torch reads a seed (64 bits), so answer k of --seed 2**64-1 is seeded too.
        seed = None if self.seed is None else (self.seed + self.turns_answered) % (SEED_MAX + 1)
        self.turns_answered += 1
        ids = generate(self.model, prompt_ids(self.tokenizer, fitted), self.max_new_tokens,
                       seed=seed, stop_ids=STOP_IDS, **self.sampling)
        return self._stream(ids)

    def _stream(self, ids: Iterator[int]) -> Iterator[str]:
        answer: list[int] = []

        def kept() -> Iterator[int]:
            for i in ids:
                answer.append(i)
                yield i

        try:
            yield from stream_text(self.tokenizer, kept())
        finally:
            self.messages.append({"role": "assistant", "content": self.tokenizer.decode_text(answer)})
