"""The training loop on the `tiny` preset: learning, exact resume, time budget, NaN handling."""

import json
import math
import signal
from dataclasses import replace

import pytest
import torch

import tinyllm.train.trainer as trainer_module
from tinyllm.config import resolve
from tinyllm.data.dataset import default_builtin_dataset
from tinyllm.errors import UserError
from tinyllm.eval.loss import LossSum, token_bytes
from tinyllm.runtime import checkpoint as ckpt
from tinyllm.runtime.checkpoint import latest_checkpoint, list_checkpoints
from tinyllm.train.run_plan import plan_run
from tinyllm.train.schedule import LRSchedule
from tinyllm.train.trainer import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return str(default_builtin_dataset(max_tokens=60_000, cache_dir=tmp_path_factory.mktemp("cache")))


def config(data: str, **train):
    overrides = [("data.dir", data, "test")] + [(f"train.{k}", v, "test") for k, v in train.items()]
    return resolve("tiny", overrides=overrides)


def losses(run) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_tiny_learns_val_loss_falls_by_a_margin(tmp_path, data):
    result = Trainer(config(data, max_steps=30, sample_every=0), tmp_path, echo=False).run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert vals[0] > 10.0  # untrained: about ln(50260) = 10.8
    assert result.val_loss == vals[-1] < vals[0] - 3.0
    assert result.stopped == "finished" and result.steps == 30 and result.tokens == 30 * 8 * 2 * 32
    assert all({"step", "loss", "lr", "tokens"} <= r.keys() for r in records if r["step"] > 0)
    assert result.checkpoint == latest_checkpoint(tmp_path) and result.checkpoint.name == "step-00000030"
    for name in ("train_output.txt", "loss.png", "config.toml"):
        assert (tmp_path / name).is_file()


def test_stopped_and_resumed_equals_uninterrupted(tmp_path, data, stopping):
    cfg = config(data, max_steps=12, checkpoint_every=0, sample_every=4, eval_every=6)
    whole = tmp_path / "whole"
    Trainer(cfg, whole, echo=False).run()

    split = tmp_path / "split"
    first = Trainer(cfg, split, echo=False)
    stopping(first, 4)  # asked for after step 4, taken at the end of the step under way: 5
    assert first.run().stopped == "interrupted"
    assert latest_checkpoint(split).name == "step-00000005"
    plan = plan_run(split)  # running again into the directory continues it
    assert plan.resume_from == latest_checkpoint(split)
    result = Trainer(plan.config, split, resume_from=plan.resume_from, echo=False).run()
    assert result.steps == 12
    assert losses(split) == losses(whole)  # every step, bit for bit
    assert len(losses(whole)) == 12


def test_ctrl_c_during_the_ranks_agreement_is_not_lost(tmp_path, data, monkeypatch):
    """A signal handler runs between bytecodes, so it can fire inside the all-reduce that agrees on
    the stop; the request it makes must survive that call's return value."""
    trainer = Trainer(config(data, max_steps=100, eval_every=0, sample_every=0), tmp_path, echo=False)
    agree = trainer_module.distributed.agree_on_next_step

    def interrupted_midway(reason, progress, d):
        agreed = agree(reason, progress, d)
        if trainer.step == 3:
            trainer.stop()  # what report.install_sigint's handler does
        return agreed

    monkeypatch.setattr(trainer_module.distributed, "agree_on_next_step", interrupted_midway)
    result = trainer.run()
    assert result.stopped == "interrupted" and result.steps == 4
    assert latest_checkpoint(tmp_path).name == "step-00000004"


def test_ctrl_c_saves_before_the_last_evaluation(tmp_path, data):
    """The save comes first: the last eval can outlast the time a launcher gives before it kills."""
    trainer = Trainer(config(data, max_steps=100, eval_every=50, sample_every=0), tmp_path, echo=False)
    original, seen = trainer._train_step, []

    def stop_at_3():
        out = original()
        if trainer.step == 3:
            trainer.stop()
        return out

    def evaluate():
        seen.append(latest_checkpoint(tmp_path))
        return LossSum(1.0, 1, 1).result()

    trainer._train_step = stop_at_3
    trainer.evaluate = evaluate
    result = trainer.run()
    assert result.stopped == "interrupted" and seen[-1].name == f"step-{result.steps:08d}"


def test_ctrl_c_during_the_final_save_still_saves_the_last_step(tmp_path, data, monkeypatch):
    """The run's last save (after its last step, no periodic one before it) answers Ctrl-C as the
    steps do: it completes, and the run ends interrupted (exit 130, so `&& tinyllm train --stage sft`
    does not go on); before, it was cut short and every step since the last checkpoint was lost."""
    trainer = Trainer(config(data, max_steps=4, checkpoint_every=0, eval_every=0, sample_every=0), tmp_path,
                      echo=False)
    save, handler = trainer_module.ckpt.save_checkpoint, signal.getsignal(signal.SIGINT)

    def ctrl_c_then_save(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return save(*args, **kwargs)

    monkeypatch.setattr(trainer_module.ckpt, "save_checkpoint", ctrl_c_then_save)
    try:
        result = trainer.run()
    except KeyboardInterrupt:
        pytest.fail("a Ctrl-C during the final save quit without saving")
    assert result.stopped == "interrupted" and result.checkpoint == latest_checkpoint(tmp_path)
    assert result.checkpoint.name == "step-00000004" and signal.getsignal(signal.SIGINT) is handler


def test_ctrl_c_during_the_final_samples_leaves_the_last_step_saved(tmp_path, data, monkeypatch):
    """The samples after the last step may be cut short by Ctrl-C; the step must be saved by then."""
    trainer = Trainer(config(data, max_steps=4, checkpoint_every=0, eval_every=0, sample_every=100), tmp_path,
                      echo=False)

    def ctrl_c_at_the_end(log, model, tok, train, step, *args):
        if step == 4:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(trainer_module.report, "write_samples", ctrl_c_at_the_end)
    # Python's own handler, as `tinyllm train` has: an earlier test in this process may
    # have left another, which the run restores after its last save.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.run()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert latest_checkpoint(tmp_path).name == "step-00000004"


def test_a_time_budget_does_not_turn_ctrl_c_into_a_budget_stop(tmp_path, data):
    trainer = Trainer(config(data, max_steps=10, eval_every=0, sample_every=0), tmp_path, echo=False)
    trainer.stop()
    trainer.stop("time budget")
    assert trainer.run().stopped == "interrupted"


def test_max_time_stops_with_a_checkpoint(tmp_path, data):
    result = Trainer(config(data, max_steps=100_000, max_time="4s", eval_every=0, sample_every=0), tmp_path,
                     echo=False).run()
    assert result.stopped == "time budget" and 0 < result.steps < 100_000
    assert latest_checkpoint(tmp_path).name == f"step-{result.steps:08d}"


class FakeClock:
    """time.monotonic for the trainer, moved on only by what the test says things cost."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


def timed_trainer(monkeypatch, cfg, run, step_seconds, eval_seconds=0.0, **kwargs) -> Trainer:
    """A Trainer on a fake clock: each step costs `step_seconds(clock)`, each evaluation
    `eval_seconds` (or `eval_seconds(clock)`)."""
    clock = FakeClock()
    monkeypatch.setattr(trainer_module, "time", clock)
    trainer = Trainer(cfg, run, echo=False, **kwargs)
    step, evaluate = trainer._train_step, trainer.evaluate

    def timed_step():
        clock.now += step_seconds(clock)
        return step()

    def timed_evaluate():
        clock.now += eval_seconds(clock) if callable(eval_seconds) else eval_seconds
        return evaluate()

    trainer._train_step, trainer.evaluate = timed_step, timed_evaluate
    return trainer


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("shape", ["wsd", "cosine"])
def test_a_run_slowed_down_halfway_ends_on_time_with_the_lr_at_its_floor(tmp_path, data, monkeypatch, shape):
    cfg = config(data, max_steps=100_000, max_time="40s", eval_every=10, sample_every=0, checkpoint_every=0)
    cfg = replace(cfg, optim=replace(cfg.optim, schedule=shape))
    # 1 s a step until half the budget, then 2 s (a second process competing for the cores); 3 s an eval.
    trainer = timed_trainer(monkeypatch, cfg, tmp_path, lambda c: 1.0 if c.now < 20 else 2.0, eval_seconds=3.0)
    result = trainer.run()
    assert result.stopped == "time budget" and result.seconds <= 40.0  # the last eval and save included
    logged = records(tmp_path)
    assert all(r["elapsed_s"] <= 40.0 for r in logged if "elapsed_s" in r)  # no step overran
    # The budget was used, less what was kept back and not spent (a step's worth for the plot and a
    # save estimated at two, both free on this clock; the last eval expected as slow as the steps
    # had become, 6 s, took 3 here) and less than a step left over.
    assert logged[-1]["step"] == result.steps and result.seconds > 40.0 - 4 * 2.0 - 3.0
    assert logged[-1]["lr"] == pytest.approx(cfg.optim.lr * cfg.optim.min_lr_ratio)  # the schedule ran its course
    lrs = [r["lr"] for r in logged if r["step"] > cfg.optim.warmup_steps]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False)) and lrs[0] > 2 * lrs[-1]


def test_a_run_slowed_tenfold_keeps_back_enough_for_its_slowed_final_eval(tmp_path, data, monkeypatch):
    # Two processes competing for the cores made a real run's steps and its final eval and save
    # ~10-30x slower; its end was kept back at their quiet costs and it overran its budget by 66 s.
    cfg = config(data, max_steps=100_000, max_time="200s", eval_every=10, sample_every=0, checkpoint_every=0)
    slow = lambda c: c.now >= 50  # noqa: E731
    trainer = timed_trainer(monkeypatch, cfg, tmp_path, lambda c: 10.0 if slow(c) else 1.0,
                            eval_seconds=lambda c: 50.0 if slow(c) else 5.0)
    result = trainer.run()
    assert result.stopped == "time budget" and result.seconds <= 200.0  # the slowed last eval included
    assert records(tmp_path)[-1]["lr"] == pytest.approx(cfg.optim.lr * cfg.optim.min_lr_ratio)


def test_a_fast_run_under_a_budget_is_capped_by_max_steps_and_ends_annealed(tmp_path, data, monkeypatch):
    cfg = config(data, max_steps=15, max_time="1h", eval_every=0, sample_every=0, checkpoint_every=0)
    result = timed_trainer(monkeypatch, cfg, tmp_path, lambda c: 0.5).run()
    assert result.stopped == "finished" and result.steps == 15
    assert records(tmp_path)[-1]["lr"] == pytest.approx(cfg.optim.lr * cfg.optim.min_lr_ratio)


def test_a_run_killed_under_a_budget_resumes_its_schedule_where_it_was(tmp_path, data, monkeypatch):
    cfg = config(data, max_steps=100_000, max_time="30s", eval_every=0, sample_every=0, checkpoint_every=5)
    whole = tmp_path / "whole"
    timed_trainer(monkeypatch, cfg, whole, lambda c: 1.0).run()

    killed = tmp_path / "killed"
    trainer = timed_trainer(monkeypatch, cfg, killed, lambda c: 1.0)
    step = trainer._train_step

    def killed_at_12():
        if trainer.step == 12:
            raise SystemExit("killed")  # as SIGKILL: nothing saved after the checkpoint at step 10
        return step()

    trainer._train_step = killed_at_12
    with pytest.raises(SystemExit):
        trainer.run()
    plan = plan_run(killed)
    assert plan.resume_from.name == "step-00000010"
    # A new process: its clock starts again; the 10 s spent come from the checkpoint.
    timed_trainer(monkeypatch, plan.config, killed, lambda c: 1.0, resume_from=plan.resume_from).run()
    want = {r["step"]: r for r in records(whole)}
    got = {r["step"]: r for r in records(killed)}
    assert got.keys() == want.keys() and got[max(got)]["elapsed_s"] == want[max(want)]["elapsed_s"] <= 30.0
    assert got[11]["lr"] == want[10]["lr"]  # the first step after the resume takes the progress saved
    # Then the seconds spent carry it: the uninterrupted run planned step 11 past the save at step 10
    # (free on this clock, estimated at two steps), so the two runs meet again at step 13.
    assert all(got[s]["lr"] == want[s]["lr"] for s in got if s <= 10 or s >= 13)
    assert got[max(got)]["lr"] == pytest.approx(cfg.optim.lr * cfg.optim.min_lr_ratio)


def test_a_run_its_budget_ended_goes_on_only_with_a_longer_budget(tmp_path, data, monkeypatch):
    cfg = config(data, max_steps=100_000, max_time="10s", eval_every=0, sample_every=0, checkpoint_every=0)
    first = timed_trainer(monkeypatch, cfg, tmp_path, lambda c: 1.0).run()
    again = timed_trainer(monkeypatch, cfg, tmp_path, lambda c: 1.0, resume_from=latest_checkpoint(tmp_path)).run()
    assert again.stopped == "already finished" and again.steps == first.steps
    assert again.seconds == first.seconds > 0  # the run's seconds, not this process's (0: a rate of 1/0)
    longer = replace(cfg, train=replace(cfg.train, max_time="20s"))
    more = timed_trainer(monkeypatch, longer, tmp_path, lambda c: 1.0, resume_from=latest_checkpoint(tmp_path)).run()
    assert more.stopped == "time budget" and more.steps > first.steps + 5
    assert 15.0 < records(tmp_path)[-1]["elapsed_s"] <= 20.0  # the first 10 s count


def test_a_budget_that_only_stops_the_process_leaves_the_schedule_to_the_steps(tmp_path, data, monkeypatch):
    """train.budget_drives_schedule = false: a job's time limit; each resumed job gets it afresh."""
    cfg = config(data, max_steps=40, max_time="10s", budget_drives_schedule=False, eval_every=0, sample_every=0,
                 checkpoint_every=0)
    first = timed_trainer(monkeypatch, cfg, tmp_path, lambda c: 1.0).run()
    assert first.stopped == "time budget" and first.steps == 10
    second = timed_trainer(monkeypatch, cfg, tmp_path, lambda c: 1.0, resume_from=latest_checkpoint(tmp_path)).run()
    assert second.stopped == "time budget" and second.steps == 20
    by_steps = LRSchedule(cfg.optim, 40)
    assert [r["lr"] for r in records(tmp_path)] == [by_steps.lr_at(i) for i in range(20)]


def test_val_loss_is_also_logged_in_bits_per_byte_of_its_targets(tmp_path, data):
    trainer = Trainer(config(data, max_steps=4, eval_every=2, sample_every=0), tmp_path, echo=False)
    result = trainer.run()
    scored = torch.cat([y[y != -1] for _, y in trainer.val_batches])
    tokens, n_bytes = scored.numel(), int(token_bytes()[scored].sum())
    evals = [r for r in records(tmp_path) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    log = (tmp_path / "train_output.txt").read_text()
    for r in evals:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2) * tokens / n_bytes, rel=1e-9)
        assert f"val loss {r['val_loss']:.4f} ({r['val_bpb']:.4f} bits/byte)" in log
    assert result.val_bpb == evals[-1]["val_bpb"]


def test_nan_steps_are_skipped_then_stop_the_run(tmp_path, data):
    trainer = Trainer(config(data, max_steps=20, max_bad_steps=3, eval_every=0, sample_every=0), tmp_path, echo=False)
    model_forward = trainer.forward
    calls = {"n": 0}

    def flaky(x, y, **kw):
        calls["n"] += 1
        loss = model_forward(x, y, **kw)
        # Micro-batches 5-6 (step 3) are NaN once; from micro-batch 11 (step 6) on, always.
        return loss * float("nan") if calls["n"] in (5, 6) or calls["n"] >= 11 else loss

    trainer.forward = flaky
    with pytest.raises(UserError, match="3 steps in a row had a NaN/Inf loss.*Lower optim.lr"):
        trainer.run()
    assert trainer.skipped == 4 and trainer.step == 8
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # never stepped on a NaN
    assert "step 8: loss nan" in (tmp_path / "train_output.txt").read_text()  # the log is closed whole
    assert trainer.log._metrics.closed


def test_finished_run_says_so_instead_of_training(tmp_path, data):
    cfg = config(data, max_steps=2, eval_every=0, sample_every=0)
    Trainer(cfg, tmp_path, echo=False).run()
    again = Trainer(cfg, tmp_path, resume_from=latest_checkpoint(tmp_path), echo=False).run()
    assert again.stopped == "already finished" and again.steps == 2
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002"]


def test_the_modern_preset_trains_with_the_same_loop(tmp_path, data):
    small = {"model.block_size": 32, "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32,
             "data.dir": data, "train.micro_batch": 8, "train.grad_accum": 1, "train.max_steps": 12,
             "train.eval_every": 12, "train.eval_batches": 2, "train.sample_every": 0, "train.dtype": "fp32",
             "optim.lr": 1e-2, "optim.warmup_steps": 2}
    cfg = resolve("modern", overrides=[(k, v, "test") for k, v in small.items()])
    assert (cfg.model.pos_emb, cfg.model.norm, cfg.model.qk_norm, cfg.model.tie_embeddings) == ("rope", "rmsnorm", True, False)
    Trainer(cfg, tmp_path, echo=False).run()
    vals = [json.loads(line)["val_loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
            if "val_loss" in line]
    assert vals[-1] < vals[0] - 1.0


# state.json's keys as every checkpoint so far has them (written by hand before the trainer had
# state_dict); renaming one would stop those runs from resuming. tokens_per_step is newer: only a
# note reads it, and checkpoints without it resume (the hand-written layout below has none).
STATE_KEYS = {"step", "tokens", "tokens_per_step", "schedule", "loader", "skipped_steps", "bad_in_row", "max_steps",
              "precision", "val_loss", "val_bpb", "python_rng", "numpy_rng"}
SCHEDULE_KEYS = {"total_steps", "max_steps", "budget_s", "elapsed_s", "progress"}


def test_a_checkpoint_is_the_trainers_state_dict_under_the_same_keys(tmp_path, data):
    cfg = config(data, max_steps=3, eval_every=3, sample_every=0)
    path = Trainer(cfg, tmp_path, echo=False).run().checkpoint
    saved = json.loads((path / "state.json").read_text())
    assert saved.keys() == STATE_KEYS and saved["schedule"].keys() == SCHEDULE_KEYS
    resumed = Trainer(cfg, tmp_path, resume_from=path, echo=False)
    state = resumed.state_dict()
    for s in (saved, state):
        s["schedule"].pop("elapsed_s")  # the clock ran on since the save
    assert state == {k: v for k, v in saved.items() if k not in ("python_rng", "numpy_rng")}


@pytest.mark.parametrize("with_bpb", [True, False])  # val_bpb came later than the rest
def test_a_checkpoint_in_the_hand_written_layout_resumes(tmp_path, data, with_bpb):
    cfg = config(data, max_steps=6, eval_every=0, sample_every=0)
    donor = Trainer(cfg, tmp_path / "donor", echo=False)  # weights, optimizer and a loader position to save
    donor.loader.next_batch()
    donor.loader.next_batch()
    old = {"tokens": 1024, "schedule": {"total_steps": 6, "max_steps": 6, "budget_s": None, "elapsed_s": 1.5,
                                        "progress": 0.0},
           "loader": donor.loader.state_dict(), "skipped_steps": 1, "bad_in_row": 0, "max_steps": 6,
           "precision": "fp32", "val_loss": 7.25, **({"val_bpb": 3.5} if with_bpb else {})}
    path = ckpt.save_checkpoint(tmp_path / "run", 2, model=donor.model, optimizer=donor.optimizer, state=old,
                                config=cfg, keep=3)
    resumed = Trainer(cfg, tmp_path / "run", resume_from=path, echo=False)
    assert (resumed.step, resumed.tokens, resumed.skipped, resumed.last_val) == (2, 1024, 1, 7.25)
    assert resumed.last_bpb == (3.5 if with_bpb else None) and resumed.schedule.elapsed_before == 1.5
    assert resumed.loader.state_dict() == old["loader"]
    result = resumed.run()
    assert result.stopped == "finished" and result.steps == 6 and result.tokens == 1024 + 4 * 8 * 2 * 32
    saved = json.loads((result.checkpoint / "state.json").read_text())
    assert saved.keys() == STATE_KEYS and saved["skipped_steps"] == 1
