"""The generation worker interleaves jobs, bounds its queue, and drops cancelled jobs."""

from __future__ import annotations

import queue
import threading

import pytest

from tinyllm.inference.sampling import generate
from tinyllm.serve.worker import GenerationWorker, Job, Overloaded, SamplingParams, Unavailable


class Recorder:
    """Collects every job's events, in the order the worker sent them."""

    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()

    def job(self, name: str, prompt: list[int], **params) -> Job:
        return Job(
            prompt,
            SamplingParams(**params),
            lambda kind, value: self.events.put((name, kind, value)),
        )

    def until_ended(self, names: set[str], timeout: float = 30) -> list[tuple]:
        seen, ended = [], set()
        while ended != names:
            event = self.events.get(timeout=timeout)
            seen.append(event)
            if event[1] in ("end", "error"):
                ended.add(event[0])
        return seen


@pytest.fixture
def worker(make_model):
    w = GenerationWorker(make_model(), max_active=4, max_queued=2)
    w.start()
    yield w
    w.stop()


def test_jobs_take_turns_token_by_token(worker):
    rec = Recorder()
    worker.submit(
        [
            rec.job("a", [1, 2, 3], max_new_tokens=5, temperature=0),
            rec.job("b", [4, 5], max_new_tokens=5, temperature=0),
        ]
    )
    events = rec.until_ended({"a", "b"})
    order = [name for name, kind, _ in events if kind == "token"]
    assert order == ["a", "b"] * 5
    assert [(name, value) for name, kind, value in events if kind == "end"] == [
        ("a", "length"),
        ("b", "length"),
    ]


def test_tokens_are_those_generate_yields(worker):
    rec = Recorder()
    worker.submit([rec.job("a", [10, 20, 30], max_new_tokens=8, temperature=0.8, seed=5)])
    got = [v for _, kind, v in rec.until_ended({"a"}) if kind == "token"]
    assert got == list(generate(worker.model, [10, 20, 30], 8, temperature=0.8, seed=5))


def test_stop_id_ends_a_job_with_reason_stop(worker):
    first = next(generate(worker.model, [7, 8], 1, temperature=0))
    rec = Recorder()
    worker.submit(
        [rec.job("a", [7, 8], max_new_tokens=10, temperature=0, stop_ids=frozenset({first}))]
    )
    assert rec.until_ended({"a"}) == [("a", "end", "stop")]


def test_a_full_queue_refuses_all_of_a_request(worker, wait_for):
    gate = threading.Event()
    rec = Recorder()
    blocking = [
        Job([1], SamplingParams(max_new_tokens=200), lambda *e: gate.wait(10)) for _ in range(4)
    ]
    worker.submit(blocking)  # four running jobs, stuck on their first token until the gate opens
    assert wait_for(lambda: worker.stats().active == 4)
    worker.submit([rec.job("q1", [1], max_new_tokens=1), rec.job("q2", [1], max_new_tokens=1)])
    with pytest.raises(Overloaded):
        worker.submit([rec.job("x", [1], max_new_tokens=1)])
    assert worker.stats().queued == 2
    for job in blocking:
        worker.cancel(job)
    gate.set()
    events = rec.until_ended({"q1", "q2"})
    assert {name for name, _, _ in events} == {"q1", "q2"}


def test_cancelled_jobs_stop_and_free_their_slot(worker):
    gate = threading.Event()
    rec = Recorder()
    running = Job([1], SamplingParams(max_new_tokens=200), lambda *e: gate.wait(10))
    worker.submit([running])
    queued = rec.job("never", [1], max_new_tokens=3)
    worker.submit([queued])
    worker.cancel(queued)  # removed from the queue, or dropped before its first step
    worker.cancel(running)
    gate.set()
    later = rec.job("later", [1], max_new_tokens=2)
    worker.submit([later])
    events = rec.until_ended({"later"})
    assert all(name == "later" for name, _, _ in events)
    assert running.generated < 200
    stats = worker.stats()
    assert stats.active == 0 and stats.queued == 0 and stats.jobs_cancelled == 2


def test_stop_fails_waiting_jobs_and_refuses_new_ones(make_model):
    w = GenerationWorker(make_model(), max_active=1, max_queued=4)
    rec = Recorder()
    with pytest.raises(Unavailable):  # not started: nobody would run the job
        w.submit([rec.job("early", [1], max_new_tokens=1)])
    w.start()
    gate = threading.Event()
    w.submit([Job([1], SamplingParams(max_new_tokens=50), lambda *e: gate.wait(0.2))])
    w.submit([rec.job("w", [1], max_new_tokens=1)])
    w.stop()
    assert rec.until_ended({"w"}) == [("w", "error", "the server is shutting down")]
    with pytest.raises(Unavailable):
        w.submit([rec.job("late", [1], max_new_tokens=1)])
