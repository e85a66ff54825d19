"""The choices of one request, run on the worker and read back as text on the event loop.

Why it is shaped this way:
- A request becomes one `Job` per choice (prompts x n), all submitted at once so a busy server
  refuses the whole request with a 429 before any response has started.
- The worker calls back on its own thread; `call_soon_threadsafe` moves each event onto the
  request's asyncio queue, so everything after that (decoding, stop strings, counting) runs on
  the event loop, single-threaded.
- Scoring (`logprobs`, `echo`) is a job too (`ChoiceSpec.score`), so it runs on the model's
  thread in turn with generation; its result arrives as `scores` before the choice ends.
- Whoever reads the deltas owns the jobs: leaving the loop early for any reason (the client went
  away, an error, a stop string) cancels the jobs still running, so no slot outlives its reader.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from tinyllm.inference.logprobs import TokenScores
from tinyllm.inference.textstream import TextStream
from tinyllm.serve.errors import APIError
from tinyllm.serve.worker import GenerationWorker, Job, Overloaded, SamplingParams, Unavailable
from tinyllm.tokenizer import Tokenizer


@dataclass(frozen=True)
class ChoiceSpec:
    """What to generate for one choice."""

    prompt_ids: list[int]
    params: SamplingParams
    stop_strings: Sequence[str] = ()
    score: int | None = None  # set: score prompt_ids with this many alternatives, generate nothing


@dataclass(frozen=True)
class Delta:
    """New text for choice `index`; `finish_reason` is set on the choice's last delta."""

    index: int
    text: str
    finish_reason: str | None = None


class GenerationFailed(Exception):
    """The worker failed a job, not the client's request: a server bug (500) or shutdown (503)."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status
        self.code = "server_unavailable" if status == 503 else None


class ChoiceRun:
    """Submit with `start()`, then read `deltas()` (or `collect()`) exactly once."""

    def __init__(
        self, worker: GenerationWorker, tokenizer: Tokenizer, specs: Sequence[ChoiceSpec]
    ) -> None:
        self._worker = worker
        self._queue: asyncio.Queue[tuple[int, str, object]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._jobs = [
            Job(s.prompt_ids, s.params, _forward_to(loop, self._queue, i), score=s.score)
            for i, s in enumerate(specs)
        ]
        self._texts = [TextStream(tokenizer, s.stop_strings) for s in specs]
        self.completion_tokens = [0] * len(specs)  # tokens the client was charged for, per choice
        self.token_ids: list[list[int]] = [[] for _ in specs]  # what each choice generated
        self.scores: list[TokenScores | None] = [None] * len(specs)  # a scoring choice's result

    def start(self) -> None:
        try:
            self._worker.submit(self._jobs)
        except Overloaded as e:
            raise APIError(429, str(e), code="server_busy") from None
        except Unavailable as e:
            raise APIError(503, str(e), code="server_unavailable") from None

    def cancel(self) -> None:
        for job in self._jobs:
            self._worker.cancel(job)

    async def deltas(self) -> AsyncIterator[Delta]:
        """Text deltas of all choices as they come, each choice ending with a finish_reason."""
        done = [False] * len(self._jobs)
        try:
            while not all(done):
                i, kind, value = await self._queue.get()
                if done[i]:
                    continue  # late events of a choice already cut by a stop string
                if kind == "scores":
                    self.scores[i] = value
                elif kind == "token":
                    self.completion_tokens[i] += 1
                    self.token_ids[i].append(value)
                    text = self._texts[i].push(value)
                    if self._texts[i].stopped:
                        done[i] = True
                        self._worker.cancel(self._jobs[i], complete=True)
                        yield Delta(i, text, "stop")
                    elif text:
                        yield Delta(i, text)
                elif kind == "end":
                    done[i] = True
                    yield Delta(i, self._texts[i].flush(), str(value))
                else:
                    raise GenerationFailed(str(value), 503 if kind == "unavailable" else 500)
        finally:
            self.cancel()

    async def collect(self) -> list[tuple[str, str]]:
        """Wait for every choice; return (text, finish_reason) per choice."""
        texts = [""] * len(self._jobs)
        reasons = [""] * len(self._jobs)
        async for d in self.deltas():
            texts[d.index] += d.text
            if d.finish_reason:
                reasons[d.index] = d.finish_reason
        return list(zip(texts, reasons, strict=True))


def _forward_to(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int):
    """A worker-thread callback that puts (index, kind, value) on `queue` in `loop`'s thread."""

    def on_event(kind: str, value: object) -> None:
        loop.call_soon_threadsafe(
            queue.put_nowait, (index, kind, value)
        )  # raises once the loop is closed

    return on_event
