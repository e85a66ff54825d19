"""The generation worker interleaves jobs, bounds its queue, and drops cancelled jobs."""

from __future__ import annotations

import queue
import threading

import pytest

from tinyllm.inference.layout import PackedLinear
from tinyllm.inference.sampling import generate
from tinyllm.model.gpt import GPT
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
            if event[1] in ("end", "error", "unavailable"):
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
    assert rec.until_ended({"w"}) == [("w", "unavailable", "the server is shutting down")]
    with pytest.raises(Unavailable):
        w.submit([rec.job("late", [1], max_new_tokens=1)])


class CountingGPT(GPT):
    """A GPT that records the batch size of every forward."""

    def forward(self, idx, *args, **kwargs):
        self.batches.append(idx.shape[0])
        return super().forward(idx, *args, **kwargs)


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_running_jobs_decode_in_one_forward_with_the_tokens_they_get_alone(make_model, pos_emb):
    model = make_model(CountingGPT, pos_emb=pos_emb)
    model.batches = []
    w = GenerationWorker(model, max_active=4)
    w.start()
    try:
        rec = Recorder()
        prompts = {"a": [1, 2, 3], "b": [4, 5, 6, 7, 8, 9, 10], "c": [11, 12]}
        lengths = {"a": 6, "b": 3, "c": 9}  # b leaves first, then a; c runs on alone
        w.submit([rec.job(k, p, max_new_tokens=lengths[k], temperature=0) for k, p in prompts.items()])
        events = rec.until_ended(set(prompts))
    finally:
        w.stop()
    batches = model.batches[:]
    assert isinstance(model.head_proj, PackedLinear)  # the worker's batches take the packed head
    for key, prompt in prompts.items():
        got = [v for name, kind, v in events if name == key and kind == "token"]
        assert got == list(generate(model, prompt, lengths[key], temperature=0)), key
    # Three prefills alone, then one forward per token for all running jobs: 3 rows until b
    # leaves, 2 until a leaves, then c alone. (Taking turns, every forward had batch 1.)
    assert batches == [1, 1, 1] + [3] * 2 + [2] * 3 + [1] * 3


def test_a_job_cancelled_or_gone_mid_batch_leaves_the_others_running(worker):
    rec = Recorder()
    got: dict[str, list[int]] = {"cancelled": [], "gone": []}

    def cancel_after_three(kind, value):
        got["cancelled"].append(value)
        if len(got["cancelled"]) == 3:
            worker.cancel(cancelled)

    def gone_after_two(kind, value):
        got["gone"].append(value)
        if len(got["gone"]) == 2:
            raise RuntimeError("event loop closed")  # what a vanished client's callback does

    cancelled = Job([3, 4], SamplingParams(max_new_tokens=50, temperature=0), cancel_after_three)
    gone = Job([5], SamplingParams(max_new_tokens=50, temperature=0), gone_after_two)
    worker.submit([rec.job("a", [1, 2], max_new_tokens=12, temperature=0), cancelled, gone])
    events = rec.until_ended({"a"})
    assert [v for _, kind, v in events if kind == "token"] == list(
        generate(worker.model, [1, 2], 12, temperature=0)
    )
    assert len(got["cancelled"]) == 3 and len(got["gone"]) == 2  # nothing after they left
    stats = worker.stats()
    assert stats.active == 0 and stats.jobs_cancelled == 1 and stats.jobs_finished == 1
