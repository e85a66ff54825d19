"""Pretraining on padded rows over a mix of sources of unequal sizes and weights (the seed
recipe's shape) through the Trainer: it learns, resumes exactly, and its periodic val loss scores
each val row once, the rows `tinyllm eval` scores, with pads never a target."""

from __future__ import annotations

import json

import pytest
import torch

from tinyllm.config import resolve
from tinyllm.data.prepare import PrepareOptions, prepare
from tinyllm.data.source_specs import resolve_sources
from tinyllm.eval.loss import evaluate_loss
from tinyllm.runtime.checkpoint import latest_checkpoint
from tinyllm.tokenizer import PAD
from tinyllm.train.trainer import Trainer

EVAL_BATCHES = 4


@pytest.fixture(scope="module")
def mix(tmp_path_factory) -> str:
    """Builtin stories (weight 1) and a few short notes weighted 3, so its val split is small."""
    root = tmp_path_factory.mktemp("mix")
    notes = [{"text": f"Note {i}: the {c} cat sat on the {c} mat."} for i, c in
             enumerate(["red", "blue", "green", "old", "big", "small"] * 6)]
    (root / "notes.jsonl").write_text("".join(json.dumps(n) + "\n" for n in notes))
    sources = resolve_sources(["builtin", f"{root / 'notes.jsonl'}:3"])
    prepare(sources, root / "data", PrepareOptions(max_tokens=40_000, val_fraction=0.1, progress=False))
    return str(root / "data")


def config(data: str, **train):
    overrides = [("data.dir", data, "test"), ("data.mode", "padded", "test"),
                 ("train.eval_batches", EVAL_BATCHES, "test"), ("train.sample_every", 0, "test")]
    return resolve("tiny", overrides=overrides + [(f"train.{k}", v, "test") for k, v in train.items()])


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_padded_pretraining_learns(tmp_path, mix):
    result = Trainer(config(mix, max_steps=30), tmp_path, echo=False).run()
    vals = [r["val_loss"] for r in records(tmp_path) if "val_loss" in r]
    assert vals[0] > 10.0  # untrained: about ln(50260) = 10.8
    assert result.val_loss == vals[-1] < vals[0] - 3.0 and result.stopped == "finished"


def test_padded_pretraining_resumes_exactly(tmp_path, mix, stopping):
    cfg = config(mix, max_steps=8, checkpoint_every=0, eval_every=4)
    whole = tmp_path / "whole"
    Trainer(cfg, whole, echo=False).run()
    split = tmp_path / "split"
    first = Trainer(cfg, split, echo=False)
    stopping(first, 3)
    first.run()
    assert latest_checkpoint(split).name == "step-00000004"
    Trainer(cfg, split, resume_from=latest_checkpoint(split), echo=False).run()
    assert [r.get("loss") for r in records(split)] == [r.get("loss") for r in records(whole)]
    assert [r.get("val_loss") for r in records(split)] == [r.get("val_loss") for r in records(whole)]


def test_periodic_val_loss_scores_each_row_once_as_tinyllm_eval_does(tmp_path, mix):
    cfg = config(mix)
    trainer = Trainer(cfg, tmp_path, echo=False)
    rows = [tuple(x[y != -1].tolist()) + (-1,) + tuple(y[y != -1].tolist())
            for xs, ys in trainer.val_batches for x, y in zip(xs, ys, strict=True)]
    budget = EVAL_BATCHES * cfg.train.micro_batch
    assert len(rows) == budget and len(set(rows)) == budget  # the budget spent, no row twice
    for xs, ys in trainer.val_batches:  # pads fill rows, never teach
        assert not (ys == PAD).any() and (ys[xs == PAD] == -1).all()
    seen = evaluate_loss(trainer.model, mix, batch_size=cfg.train.micro_batch, context=cfg.model.block_size,
                         max_batches=EVAL_BATCHES, mode="padded")
    assert sorted(seen.sources) == ["builtin", "local-notes"]  # the small source has its share
    ours = trainer.evaluate()
    assert ours.loss == pytest.approx(seen.loss, rel=1e-6)
    assert ours.bits_per_byte == pytest.approx(seen.bits_per_byte, rel=1e-6)
    batch = trainer.loader.next_batch()
    assert batch.inputs.dtype == torch.int64 and not (batch.targets == PAD).any()
