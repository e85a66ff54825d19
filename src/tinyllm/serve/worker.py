"""The generation worker: one thread owns the model and advances every running request at once.

Why it is shaped this way:
- One thread, one model. PyTorch already spreads each forward over the cores, so running
  requests on several threads would only make them fight; and the HTTP event loop never blocks on
  a forward, because it never runs one.
- Work goes in rounds. A round first starts the jobs admitted since the last one: each prompt is
  prefilled alone and its first token sent (a scoring job is scored whole). Then one forward
  decodes the next token of every running job together (`tinyllm.inference.batch.BatchDecoder`:
  per-row positions and padding masks, per-row sampling). Decoding is bound by reading the
  weights, so one forward for 8 jobs costs little more than one for 1: throughput grows with the
  number of clients, where taking turns one forward each kept it flat. Every client sees its first
  token after at most one round, and a short request is not stuck behind a long one. Jobs beyond
  `max_active` wait in a FIFO queue; beyond `max_queued` the worker refuses work (`Overloaded`)
  rather than let latency grow without bound.
- The worker sees token ids only. It reports each job's progress through the job's `on_event`
  callback, called on the worker thread; the server passes one that hops onto its event loop.
- The worker thread sets its own PyTorch thread count (thread-local under OpenMP), by default one
  less than PyTorch's: on a small CPU the HTTP event loop needs a core too, and OpenMP threads
  that spin while another thread holds their core made decoding >10x slower on a busy 2-core machine.
- Cancelling is a flag the worker checks before each forward, so a client that disconnects frees
  its slot (its row of the batch) within one round, and a queued job that is cancelled never
  starts. Jobs join and leave the batch only between forwards.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from tinyllm.inference.batch import BatchDecoder
from tinyllm.inference.layout import pack_head
from tinyllm.inference.logprobs import token_logprobs
from tinyllm.model.gpt import GPT

log = logging.getLogger("tinyllm.serve")

# Event kinds passed to Job.on_event: ("token", id), ("end", "stop" | "length"), ("error", message)
# for a failure, ("unavailable", message) for a job cut off by shutdown (HTTP 503, not 500: the
# request was fine and may be retried), and for a scoring job ("scores", TokenScores) before its end.
EventCallback = Callable[[str, object], None]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_ids: frozenset[int] = field(default_factory=frozenset)
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id -> added to its logit


class Job:
    """One sequence to generate: a prompt, how to sample it, and where its events go.

    With `score` set the job generates nothing: it scores every token of the prompt, with the
    `score` best alternatives per position (`token_logprobs`), in one forward on this thread.
    """

    def __init__(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        on_event: EventCallback,
        score: int | None = None,
    ) -> None:
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.on_event = on_event
        self.score = score
        self.generated = 0
        self._cancelled = threading.Event()
        self._complete = False  # cancelled because its text was complete (a stop string): finished
        self._done = False  # finished, failed or dropped: the worker forgets it this round

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class Unavailable(Exception):
    """The worker is not running (not started yet, or shutting down)."""


class Overloaded(Unavailable):
    """The queue is full; the client should retry later."""


@dataclass(frozen=True)
class WorkerStats:
    active: int
    queued: int
    max_active: int
    max_queued: int
    tokens_generated: int
    jobs_finished: int
    jobs_cancelled: int


class GenerationWorker:
    """Owns `model` and runs submitted `Job`s on its own thread until `stop()`."""

    def __init__(
        self, model: GPT, *, max_active: int = 32, max_queued: int = 256, threads: int | None = None
    ) -> None:
        if max_active < 1 or max_queued < 0:
            raise ValueError(
                f"need max_active >= 1 and max_queued >= 0, got {max_active}, {max_queued}"
            )
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.model = model
        self.threads = threads or max(1, torch.get_num_threads() - 1)
        self.max_active = max_active
        self.max_queued = max_queued
        self._cond = threading.Condition()
        self._pending: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []  # touched only by the worker thread
        self._decoder = BatchDecoder(model)  # the running jobs' rows, keyed by job
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._tokens_generated = 0
        self._jobs_finished = 0
        self._jobs_cancelled = 0

    # -- called from any thread ---------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the worker is already running")
        self.model.eval()  # once for all jobs: the batch decoder needs eval mode
        pack_head(self.model)  # batches of rows through the head: oneDNN's packed GEMM on CPU
        self._thread = threading.Thread(target=self._run, name="tinyllm-generation", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the current step, fail every job still waiting or running, and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread = self._thread  # the server's shutdown and its lifespan may both stop it, on two threads
        if thread is not None:
            thread.join(timeout)
            self._thread = None

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue all of `jobs`, or none of them (raises `Overloaded` when they do not fit).

        Raises `Unavailable` unless the worker is running, rather than queue jobs nobody will run.
        """
        with self._cond:
            if self._stopping or self._thread is None:
                raise Unavailable(
                    "the generation worker is not running (server starting or stopping)"
                )
            free = self.max_active - len(self._active) + self.max_queued - len(self._pending)
            if len(jobs) > free:
                busy = f"{len(self._active)} running, {len(self._pending)} queued"
                raise Overloaded(f"the server is busy ({busy}): retry later")
            self._pending.extend(jobs)
            self._cond.notify_all()

    def cancel(self, job: Job, *, complete: bool = False) -> None:
        """Stop `job`: a queued one never starts, a running one stops before its next token.
        `complete`: its text is whole (a stop string matched), so /health counts it finished."""
        job._complete = job._complete or complete  # the request's own clean-up cancels it again
        job._cancelled.set()
        with self._cond:
            try:
                self._pending.remove(job)
            except ValueError:
                return  # running (the worker drops it on its next round) or already done
            self._count_dropped(job)

    def _count_dropped(self, job: Job) -> None:
        """Count a job cancelled before its end (with `_cond` held: cancel() runs on other threads)."""
        if job._complete:
            self._jobs_finished += 1
        else:
            self._jobs_cancelled += 1

    def stats(self) -> WorkerStats:
        with self._cond:
            queued = len(self._pending)
        return WorkerStats(
            len(self._active),
            queued,
            self.max_active,
            self.max_queued,
            self._tokens_generated,
            self._jobs_finished,
            self._jobs_cancelled,
        )

    # -- the worker thread --------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_num_threads(self.threads)  # for this thread only
        while True:
            with self._cond:
                while not (self._stopping or self._pending or self._active):
                    self._cond.wait()
                if self._stopping:
                    break
                joining = []
                while self._pending and len(self._active) < self.max_active:
                    joining.append(self._pending.popleft())
                self._active.extend(joining)
            self._round(joining)
        with self._cond:
            leftover = self._active + list(self._pending)
            self._active, self._pending = [], collections.deque()
        self._decoder = BatchDecoder(self.model)
        for job in leftover:
            _notify(job, "unavailable", "the server is shutting down")

    def _round(self, joining: list[Job]) -> None:
        """Start the jobs just admitted, then decode one token of every running job together."""
        self._drop_cancelled()
        for job in joining:
            if not job._done:
                self._start(job)
        self._drop_cancelled()  # a client may have gone while the prompts were prefilled
        if len(self._decoder):
            try:
                tokens = self._decoder.step()
            except Exception as e:  # a bug: every job in the forward fails, the server goes on
                for job in self._active:
                    if job in self._decoder:
                        self._fail(job, e)
                self._decoder = BatchDecoder(self.model)
            else:
                for job in self._active:
                    if job in tokens:
                        self._emit(job, tokens[job])
        self._active = [job for job in self._active if not job._done]

    def _drop_cancelled(self) -> None:
        for job in self._active:
            if job.cancelled and not job._done:
                self._retire(job)
                with self._cond:
                    self._count_dropped(job)

    def _start(self, job: Job) -> None:
        """Score a scoring job, or prefill a generating one and send its first token."""
        p = job.params
        try:
            if job.score is not None:
                scores = token_logprobs(self.model, job.prompt_ids, job.score)
                if _notify(job, "scores", scores):
                    self._finish(job, "length")
                else:
                    self._retire(job)
                return
            if p.max_new_tokens == 0:  # max_tokens 0 (echo alone) is cut by the length limit
                self._finish(job, "length")
                return
            token = self._decoder.add(
                job,
                job.prompt_ids,
                temperature=p.temperature,
                top_k=p.top_k,
                top_p=p.top_p,
                seed=p.seed,
                stop_ids=p.stop_ids,
                logit_bias=p.logit_bias,
            )
        except Exception as e:  # a bug, or a job the server should have refused: fail this job only
            self._fail(job, e)
            return
        self._emit(job, token)

    def _emit(self, job: Job, token: int | None) -> None:
        """Send `job` its next token (None: it ended) and finish it at its length limit."""
        if token is None:
            self._finish(job, self._end_reason(job))
            return
        job.generated += 1
        self._tokens_generated += 1
        if not _notify(job, "token", token):
            self._retire(job)
        elif job.generated >= job.params.max_new_tokens:
            self._finish(job, "length")

    def _end_reason(self, job: Job) -> str:
        # The decoder ends a row early on a stop id, or when the context is full (learned positions).
        full = len(job.prompt_ids) + job.generated >= self.model.config.block_size
        return "length" if full and self.model.config.pos_emb == "learned" else "stop"

    def _finish(self, job: Job, reason: str) -> None:
        self._retire(job)
        self._jobs_finished += 1
        _notify(job, "end", reason)

    def _fail(self, job: Job, e: Exception) -> None:
        log.exception("generation failed", exc_info=e)
        self._retire(job)
        _notify(job, "error", f"generation failed: {type(e).__name__}: {e}")

    def _retire(self, job: Job) -> None:
        job._done = True
        self._decoder.remove(job)


def _notify(job: Job, kind: str, value: object) -> bool:
    """Deliver an event; a receiver that is gone (its event loop closed) cancels the job."""
    try:
        job.on_event(kind, value)
        return True
    except Exception:
        job._cancelled.set()
        return False
