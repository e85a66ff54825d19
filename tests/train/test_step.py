"""The training hot path reads nothing back from the device between the steps that log, evaluate or
save (on a GPU each read makes the host wait for all queued work), and what those reads served
still holds: token ids are checked, a NaN/Inf step is skipped and counted."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tinyllm.config import resolve
from tinyllm.data.dataset import default_builtin_dataset
from tinyllm.errors import UserError
from tinyllm.train.trainer import Trainer

# Ops that hand a device value to the host: the scalar read behind item()/int()/bool()/float(), and
# those whose output size depends on the data (the host must learn it before allocating).
SYNCING_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "equal")
# Python-level reads; on a CPU tensor some (tolist) never reach the dispatcher, on a GPU all sync.
READ_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return str(default_builtin_dataset(max_tokens=60_000, cache_dir=tmp_path_factory.mktemp("cache")))


class HostReads(TorchDispatchMode):
    """Records each op that would make the host wait for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        bool_index = name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                             for i in (args[1] if len(args) > 1 else []) if i is not None)
        if name in SYNCING_OPS or bool_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_reads(monkeypatch, reads: HostReads):
    """`reads` records every read of a tensor while this lasts, by the dispatcher and by Python."""
    with monkeypatch.context() as m:
        for method in READ_METHODS:
            original = getattr(torch.Tensor, method)

            def read(self, *args, _original=original, _method=method):
                reads.seen.append(_method)
                return _original(self, *args)

            m.setattr(torch.Tensor, method, read)
        with reads:
            yield


def trainer(data: str, tmp_path, **train) -> Trainer:
    settings = {"max_steps": 8, "log_every": 4, "eval_every": 0, "sample_every": 0, "checkpoint_every": 0,
                **train}
    overrides = [("data.dir", data, "test")] + [(f"train.{k}", v, "test") for k, v in settings.items()]
    return Trainer(resolve("tiny", overrides=overrides), tmp_path, echo=False)


def count_reads_per_step(t: Trainer, monkeypatch) -> dict[int, int]:
    """Run `t`; for each step, the reads its step and its bookkeeping made."""
    per_step: dict[int, int] = {}
    step, after = t._train_step, t._after_step

    def counted(fn):
        def run(*args):
            reads = HostReads()
            with counting_reads(monkeypatch, reads):
                out = fn(*args)
            per_step[t.step] = per_step.get(t.step, 0) + len(reads.seen)
            return out
        return run

    t._train_step, t._after_step = counted(step), counted(after)
    t.run()
    return per_step


def test_steps_between_log_steps_read_nothing_back_from_the_device(data, tmp_path, monkeypatch):
    t = trainer(data, tmp_path)  # the tiny preset: fp32, fused AdamW, 2 micro-batches a step
    per_step = count_reads_per_step(t, monkeypatch)
    assert sorted(per_step) == list(range(1, 9))
    assert {s: n for s, n in per_step.items() if s % 4} == {s: 0 for s in (1, 2, 3, 5, 6, 7)}
    assert per_step[4] > 0 and per_step[8] > 0  # the log steps do read: the counting works
    logged = [r for r in t.log.history if "loss" in r]
    assert [r["step"] for r in logged] == [4, 8] and all(math.isfinite(r["loss"]) for r in logged)


def test_the_counter_sees_the_reads_the_hot_path_used_to_make(monkeypatch):
    """Each way of reading a tensor that the old step used (int(), bool(), float(), .item(),
    .tolist(), boolean indexing) is counted."""
    x = torch.arange(6.0)
    for read in (lambda: int(x.sum()), lambda: bool(x.any()), lambda: float(x[0]), lambda: x.sum().item(),
                 lambda: x.tolist(), lambda: x[x > 2]):
        reads = HostReads()
        with counting_reads(monkeypatch, reads):
            read()
        assert reads.seen, read


def test_a_nan_step_between_log_steps_is_skipped_and_reported_at_the_next_read(data, tmp_path):
    t = trainer(data, tmp_path, max_steps=8, log_every=4)
    forward, calls = t.forward, {"n": 0}

    def flaky(x, y, **kw):
        calls["n"] += 1
        loss = forward(x, y, **kw)
        return loss * float("nan") if calls["n"] in (3, 4) else loss  # step 2's two micro-batches

    t.forward = flaky
    before = {}
    original_after = t._after_step

    def watch(*args):
        before[t.step] = t.model.wte.weight.detach().clone()
        return original_after(*args)

    t._after_step = watch
    t.run()
    assert t.skipped == 1
    assert torch.equal(before[2], before[1]) and not torch.equal(before[3], before[2])  # no weight moved
    log = (tmp_path / "train_output.txt").read_text()
    assert "step 2: loss nan / grad norm" in log and "step skipped (1 in a row, 1 in all)" in log
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_too_many_nan_steps_between_log_steps_stop_the_run_at_the_read(data, tmp_path):
    t = trainer(data, tmp_path, max_steps=12, log_every=4, max_bad_steps=2)
    forward = t.forward
    t.forward = lambda x, y, **kw: forward(x, y, **kw) * float("nan")
    with pytest.raises(UserError, match=r"2 steps in a row had a NaN/Inf loss or gradient \(up to step 2\)"):
        t.run()
    assert t.step == 4  # found at the first read


def test_out_of_range_ids_in_the_data_are_refused_before_the_copy_to_the_device(data, tmp_path):
    t = trainer(data, tmp_path, max_steps=1)
    next_batch = t.loader.next_batch

    def corrupt():
        batch = next_batch()
        batch.inputs[0, 0] = t.cfg.model.vocab_size
        return batch

    t.loader.next_batch = corrupt
    with pytest.raises(UserError, match=r"input token ids \d+\.\.\d+, outside the model's vocabulary"):
        t.run()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_steps_between_log_steps_never_wait_for_it(data, tmp_path):
    """The same on the device itself: CUDA's sync debug mode raises at any call that waits."""
    t = trainer(data, tmp_path, device="cuda")
    step, after = t._train_step, t._after_step

    def strict(fn, reads):
        def run(*args):
            if reads():
                return fn(*args)
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return run

    # Step 1 may wait (CUDA's first calls set it up); the log steps 4 and 8 read.
    t._train_step, t._after_step = strict(step, lambda: t.step == 0), strict(after, lambda: t.step % 4 == 0)
    t.run()
    assert [r["step"] for r in t.log.history if "loss" in r] == [4, 8]
