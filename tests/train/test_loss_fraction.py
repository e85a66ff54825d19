"""`train.loss_fraction`: pretraining scores a random share of positions, the same ones on a resume;
validation scores all; chat fine-tuning scores every answer token again."""

from __future__ import annotations

import json

import pytest
import torch

from tinyllm.config import resolve
from tinyllm.data.loader import Batch
from tinyllm.errors import UserError
from tinyllm.runtime.checkpoint import latest_checkpoint
from tinyllm.runtime.run_dir import TEXT_LOG
from tinyllm.train.sft import sft_config
from tinyllm.train.step import keep_scored
from tinyllm.train.trainer import Trainer


def config(data: str, **train):
    overrides = [("data.dir", data, "test"), ("train.sample_every", 0, "test"), ("train.eval_batches", 2, "test"),
                 ("train.loss_fraction", 0.3, "test")]
    return resolve("tiny", overrides=overrides + [(f"train.{k}", v, "test") for k, v in train.items()])


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_share_of_the_targets_is_kept_and_the_rest_ignored():
    inputs = torch.arange(4000).view(8, 500)
    targets = inputs + 1
    targets[:, :100] = -1  # already ignored (a pad, a prompt token): stays ignored
    kept = keep_scored(Batch(inputs, targets), 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(kept.inputs, inputs)
    scored = kept.targets != -1
    assert not scored[:, :100].any()
    assert torch.equal(kept.targets[scored], targets[scored])  # a kept target is unchanged
    assert 0.27 < scored[:, 100:].float().mean() < 0.33
    again = keep_scored(Batch(inputs, targets), 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(again.targets, kept.targets)  # the generator decides
    assert keep_scored(Batch(inputs, targets), 1.0, torch.Generator()).targets is targets


@pytest.mark.parametrize("bad", [0, -0.5, 1.5])
def test_a_share_outside_0_1_is_a_config_error(bad):
    with pytest.raises(UserError, match=r"train.loss_fraction must be in \(0, 1\]"):
        resolve("tiny", overrides=[("train.loss_fraction", bad, "test")])


def test_pretraining_on_a_share_learns_says_so_and_resumes_exactly(tmp_path, data, stopping):
    cfg = config(data, max_steps=8, checkpoint_every=0, eval_every=4)
    whole = tmp_path / "whole"
    result = Trainer(cfg, whole, echo=False).run()
    assert "tokens/step, loss on a random 30% of positions, " in (whole / TEXT_LOG).read_text()
    vals = [r["val_loss"] for r in records(whole) if "val_loss" in r]
    assert result.val_loss == vals[-1] < vals[0]
    split = tmp_path / "split"
    first = Trainer(cfg, split, echo=False)
    stopping(first, 3)
    first.run()
    Trainer(cfg, split, resume_from=latest_checkpoint(split), echo=False).run()
    assert [r.get("loss") for r in records(split)] == [r.get("loss") for r in records(whole)]
    assert [r.get("val_loss") for r in records(split)] == [r.get("val_loss") for r in records(whole)]


def test_the_scored_positions_change_with_the_step_and_validation_scores_all(tmp_path, data, monkeypatch):
    from tinyllm.train import step as step_module

    seen = []

    def spy(batch, fraction, generator):
        kept = keep_scored(batch, fraction, generator)
        seen.append(kept.targets)
        return kept

    monkeypatch.setattr(step_module, "keep_scored", spy)
    trainer = Trainer(config(data, max_steps=2), tmp_path, echo=False)
    trainer.run()
    assert len(seen) == 2 * trainer.grad_accum
    first, second = seen[0], seen[trainer.grad_accum]
    assert not torch.equal(first != -1, second != -1)
    assert all(0.2 < (y != -1).float().mean() < 0.4 for y in seen)
    assert all((y != -1).all() for _, y in trainer.val_batches)  # packed rows: every position scored


def test_chat_fine_tuning_scores_every_answer_token(tmp_path, data):
    Trainer(config(data, max_steps=2), tmp_path / "pre", echo=False).run()
    assert sft_config(tmp_path / "pre").train.loss_fraction == 1.0
