"""The training loop on the `tiny` preset: learning, exact resume, time budget, NaN handling."""

import json

import pytest
import torch

import tinyllm.train.trainer as trainer_module
from tinyllm.config import resolve
from tinyllm.data.loader import default_builtin_dataset
from tinyllm.errors import UserError
from tinyllm.train.checkpoint import latest_checkpoint, list_checkpoints
from tinyllm.train.run_dir import plan_run
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


def test_stopped_and_resumed_equals_uninterrupted(tmp_path, data):
    cfg = config(data, max_steps=12, checkpoint_every=0, sample_every=4, eval_every=6)
    whole = tmp_path / "whole"
    Trainer(cfg, whole, echo=False).run()

    split = tmp_path / "split"
    first = Trainer(cfg, split, echo=False)
    original = first._after_step

    def stop_at_5(*args):  # asked for after step 4, taken at the end of the step under way: 5
        original(*args)
        if first.step == 4:
            first.stop()

    first._after_step = stop_at_5
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
    agree = trainer_module.distributed.agree_on_stop

    def interrupted_midway(reason, d):
        agreed = agree(reason, d)
        if trainer.step == 3:
            trainer.stop()  # what report.install_sigint's handler does
        return agreed

    monkeypatch.setattr(trainer_module.distributed, "agree_on_stop", interrupted_midway)
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
        return 1.0

    trainer._train_step = stop_at_3
    trainer.evaluate = evaluate
    result = trainer.run()
    assert result.stopped == "interrupted" and seen[-1].name == f"step-{result.steps:08d}"


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
    """time.monotonic for the trainer, moved on only by training steps."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


def test_schedule_is_fitted_to_the_time_budget(tmp_path, data, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(trainer_module, "time", clock)
    cfg = config(data, max_steps=100_000, max_time="10s", fit_steps_to_time=True, eval_every=0, sample_every=0,
                 checkpoint_every=0)
    trainer = Trainer(cfg, tmp_path, echo=False)
    step = trainer._train_step

    def half_a_second_step():
        clock.now += 0.5
        return step()

    trainer._train_step = half_a_second_step
    result = trainer.run()
    # 10 s at 0.5 s a step, less what is kept back for the end of the run (a few steps' worth).
    assert 12 <= trainer.schedule.total_steps < 20
    assert result.stopped == "finished" and result.steps == trainer.schedule.total_steps
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["lr"] == pytest.approx(cfg.optim.lr * cfg.optim.min_lr_ratio)  # the schedule ran its course


def test_nan_steps_are_skipped_then_stop_the_run(tmp_path, data):
    trainer = Trainer(config(data, max_steps=20, max_bad_steps=3, eval_every=0, sample_every=0), tmp_path, echo=False)
    model_forward = trainer.forward
    calls = {"n": 0}

    def flaky(x, y):
        calls["n"] += 1
        loss = model_forward(x, y)
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
    small = {"model.block_size": 32, "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "data.context": 32,
             "data.dir": data, "train.micro_batch": 8, "train.grad_accum": 1, "train.max_steps": 12,
             "train.eval_every": 12, "train.eval_batches": 2, "train.sample_every": 0, "train.dtype": "fp32",
             "optim.lr": 1e-2, "optim.warmup_steps": 2}
    cfg = resolve("modern", overrides=[(k, v, "test") for k, v in small.items()])
    assert (cfg.model.pos_emb, cfg.model.norm, cfg.model.qk_norm, cfg.model.tie_embeddings) == ("rope", "rmsnorm", True, False)
    Trainer(cfg, tmp_path, echo=False).run()
    vals = [json.loads(line)["val_loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
            if "val_loss" in line]
    assert vals[-1] < vals[0] - 1.0
