"""Chat fine-tuning: starts from a pretrained run, puts the loss on assistant tokens only, learns to
answer, and resumes exactly.

One tiny model is pretrained once for the module (the `tiny` preset at context 64) and the fast
tests fine-tune it for a few steps. Learning to answer takes longer, so that test trains its own
model on the builtin grammar with a small lexicon (20 s of the file's 30 s on 2 idle cores).
"""

import copy
import json
import re
from functools import partial

import pytest
import torch

from tinyllm.config import resolve
from tinyllm.data.builtin import BuiltinCorpus, Lexicon
from tinyllm.data.prepare import PrepareOptions, prepare
from tinyllm.data.source_specs import resolve_sources
from tinyllm.data.sources import BuiltinSource
from tinyllm.errors import UserError
from tinyllm.eval.loss import evaluate_loss
from tinyllm.eval.qa import qa_accuracy
from tinyllm.runtime.checkpoint import latest_checkpoint, load_model, read_config
from tinyllm.tokenizer import IM_END, IM_START, PAD, get_tokenizer
from tinyllm.train import report as report_module
from tinyllm.train import trainer as trainer_module
from tinyllm.train.run_plan import plan_run
from tinyllm.train.sft import SFT_DEFAULTS
from tinyllm.train.trainer import Trainer

from .test_trainer import records, timed_trainer

CONTEXT = 64
PRETRAIN_STEPS = 20


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    # A fifth held out, so the end-of-run QA has held-out questions that fit the context.
    out = tmp_path_factory.mktemp("builtin")
    prepare(resolve_sources([]), out, PrepareOptions(max_tokens=60_000, val_fraction=0.2, progress=False))
    return str(out)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data):
    settings = {"data.dir": data, "model.block_size": CONTEXT, "train.max_steps": PRETRAIN_STEPS,
                "train.grad_accum": 1, "train.eval_every": 0, "train.sample_every": 0, "train.checkpoint_every": 0,
                "optim.lr": 1e-2}
    run = tmp_path_factory.mktemp("pretrained")
    Trainer(resolve("tiny", overrides=[(k, v, "test") for k, v in settings.items()]), run, echo=False).run()
    return run


def sft_plan(run_dir, pretrained, **settings):
    overrides = [(k, v, "test") for k, v in settings.items()]
    return plan_run(run_dir, stage="sft", init=str(pretrained), overrides=overrides)


QUIET = {"train.eval_every": 0, "train.qa_questions": 0, "train.checkpoint_every": 0, "train.max_time": "none",
         "train.micro_batch": 4, "train.eval_batches": 4}


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sft_takes_the_model_and_data_from_the_pretrained_run(tmp_path, pretrained):
    before = read_config(pretrained)
    cfg = sft_plan(tmp_path / "sft", pretrained).config
    assert cfg.model == before.model  # not repeated on the command line
    assert cfg.data.dir == before.data.dir and cfg.data.loss_on == "assistant"
    assert cfg.train.stage == "sft" and cfg.train.init == str(latest_checkpoint(pretrained).resolve())
    assert cfg.optim.lr < before.optim.lr
    assert sft_plan(tmp_path / "sft", pretrained, **{"optim.lr": 1e-4}).config.optim.lr == 1e-4


def test_fine_tuning_a_fine_tuned_run_keeps_its_learning_rate(tmp_path, pretrained):
    """A second round (say, your own chat data after the built-in questions) is fine-tuning too:
    its rate is the first round's, not 0.3x of it again."""
    first = sft_plan(tmp_path / "first", pretrained, **QUIET, **{"train.max_steps": 1}).config
    Trainer(first, tmp_path / "first", echo=False).run()
    again = sft_plan(tmp_path / "again", tmp_path / "first").config
    assert first.optim.lr == read_config(pretrained).optim.lr * 0.3
    assert again.optim.lr == first.optim.lr and again.train.init == str(latest_checkpoint(tmp_path / "first"))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"stage": "sft"}, "--stage sft fine-tunes a pretrained model: add --init RUN_DIR"),
    ({"init": "PRETRAINED"}, "names the pretrained run to fine-tune: add --stage sft"),
    ({"stage": "sft", "init": "PRETRAINED", "preset": "cpu"}, "--preset does not apply to --stage sft"),
    ({"stage": "sft", "init": "PRETRAINED", "overrides": [("model.n_layer", 3, "--set")]},
     r"keeps the shape of the model .*: drop model.n_layer \(2 -> 3\)"),
    ({"stage": "sft", "init": "/no/such/run"}, "no such run or checkpoint directory"),
])
def test_sft_mistakes_are_one_line_errors_with_the_fix(tmp_path, pretrained, kwargs, message):
    kwargs = {k: str(pretrained) if v == "PRETRAINED" else v for k, v in kwargs.items()}
    with pytest.raises(UserError, match=message):
        plan_run(tmp_path / "sft", **kwargs)


def test_only_assistant_tokens_reach_the_loss(tmp_path, pretrained):
    """Every target is inside an assistant turn, each answer's <|im_end|> is one, and the step's
    loss is the mean over the step's targets, however they fall across micro-batches."""
    cfg = sft_plan(tmp_path, pretrained, **QUIET, **{"train.max_steps": 2, "train.grad_accum": 2}).config
    trainer = Trainer(cfg, tmp_path, echo=False)
    initial = copy.deepcopy(trainer.model)
    weights = load_model(pretrained)[0].state_dict()
    assert all(torch.equal(p, weights[n]) for n, p in initial.state_dict().items())  # starts from --init
    seen, forward = [], trainer.forward
    trainer.forward = lambda x, y, **kw: seen.append((x, y)) or forward(x, y, **kw)
    trainer.run()
    assert len(seen) == 4
    tok = get_tokenizer()

    def answer_starts(row: list[int], t: int) -> int | None:
        """Where the assistant's text begins, if position t is in an assistant turn."""
        heads = [i for i in range(t + 1) if row[i] == IM_START]
        return heads[-1] + 4 if heads and tok.decode(row[heads[-1] + 1:heads[-1] + 4]) == "assistant\n" else None

    for x, y in seen:
        assert (y != -1).any(dim=1).all()  # no row without a target
        for row, targets in zip(x.tolist(), y.tolist(), strict=True):
            for t, target in enumerate(targets):
                if target != -1:  # the target is token t + 1: in the answer text or its <|im_end|>
                    assert (begin := answer_starts(row, t)) is not None and t + 1 >= begin
                elif t + 1 < len(row) and row[t + 1] == IM_END:  # a user turn's end carries no loss
                    assert answer_starts(row, t) is None
        assert (y != -1).float().mean() < 0.3  # stories and questions carry no loss
    first = next(r for r in metrics(tmp_path) if r.get("step") == 1)
    counts = [int((y != -1).sum()) for _, y in seen[:2]]
    with torch.no_grad():
        token_mean = sum(initial(x, y).item() * n for (x, y), n in zip(seen[:2], counts, strict=True)) / sum(counts)
    assert first["loss"] == pytest.approx(token_mean, rel=1e-5)


def test_micro_batches_are_weighted_by_their_targets(tmp_path, pretrained):
    """Accumulating padded micro-batches gives the gradient of one batch holding them all."""
    settings = {**QUIET, "train.max_steps": 1, "train.grad_accum": 3, "optim.grad_clip": 0.0}
    trainer = Trainer(sft_plan(tmp_path, pretrained, **settings).config, tmp_path, echo=False)
    reference = copy.deepcopy(trainer.model)
    batches, next_batch = [], trainer.loader.next_batch
    trainer.loader.next_batch = lambda: batches.append(next_batch()) or batches[-1]
    grads = {}
    trainer.optimizer.step = lambda: grads.update({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
    trainer._train_step()

    width = max(b.inputs.shape[1] for b in batches)
    pad = lambda t, value: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)  # noqa: E731
    x = torch.cat([pad(b.inputs, PAD) for b in batches])
    y = torch.cat([pad(b.targets, -1) for b in batches])
    assert len({int((b.targets != -1).sum()) for b in batches}) > 1  # unequal, so weighting matters
    reference(x, y).backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-7)


def test_periodic_val_loss_agrees_with_tinyllm_eval(tmp_path, pretrained):
    cfg = sft_plan(tmp_path, pretrained, **QUIET).config
    trainer = Trainer(cfg, tmp_path, echo=False)
    full = evaluate_loss(trainer.model, cfg.data.dir, batch_size=cfg.train.micro_batch, context=cfg.model.block_size,
                         max_batches=cfg.train.eval_batches, mode="padded", loss_on="assistant")
    ours = trainer.evaluate()
    assert ours.loss == pytest.approx(full.loss, rel=1e-6)
    assert ours.bits_per_byte == pytest.approx(full.bits_per_byte, rel=1e-6)


def test_sft_uses_its_time_budget_to_the_end_after_slow_first_steps(tmp_path, pretrained, monkeypatch):
    """Its schedule follows the time spent: slow first steps (a cold machine) no longer fit a short
    horizon that ends the run with half the budget left."""
    plan = sft_plan(tmp_path, pretrained, **{**QUIET, "train.max_time": "40s"})
    assert plan.config.train.max_steps == SFT_DEFAULTS["train"]["max_steps"]
    result = timed_trainer(monkeypatch, plan.config, tmp_path, lambda c: 2.0 if c.now < 12 else 0.5).run()
    assert result.stopped == "time budget" and 40.0 - 4 * 0.5 < result.seconds <= 40.0
    last = records(tmp_path)[-1]
    assert last["step"] == result.steps and last["lr"] == pytest.approx(plan.config.optim.lr * 0.1)


@pytest.mark.parametrize(("questions", "probe", "expected"), [(8, 4, [4, 8]), (20, 16, [10, 10])])
def test_sft_keeps_back_the_time_of_its_held_out_questions(tmp_path, pretrained, monkeypatch, questions, probe,
                                                           expected):
    """The end-of-run QA is timed on its first questions before the first step and kept back from
    the budget, so the run still ends on time (unreserved, 200 questions overran 3 minutes by 9 s).
    Asked for more questions than fit the context (20; 10 fit in 64 tokens), the probe asks all there
    are and only those are kept back (it once reserved 20 and the run ended 6.5 s early)."""
    plan = sft_plan(tmp_path, pretrained, **{**QUIET, "train.max_time": "40s", "train.qa_questions": questions})
    trainer = timed_trainer(monkeypatch, plan.config, tmp_path, lambda c: 0.5)
    clock = trainer_module.time
    monkeypatch.setattr(report_module, "time", clock)
    monkeypatch.setattr(report_module, "qa_seconds", partial(report_module.qa_seconds, probe=probe))
    asked = []

    def slow_qa(model, data_dir, questions):  # half a second a question on the run's clock
        result = real_qa(model, data_dir, questions)
        clock.now += 0.5 * result.total
        asked.append(result.total)
        return result

    real_qa = report_module.held_out_qa
    monkeypatch.setattr(report_module, "held_out_qa", slow_qa)
    result = trainer.run()
    # Less than a step, a checkpoint's unmeasured estimate (two steps) and the log's step unspent.
    assert result.stopped == "time budget" and 40.0 - 4 * 0.5 - 0.01 < result.seconds <= 40.0
    assert asked == expected and result.qa_accuracy is not None  # the probe, then the end-of-run QA


def test_sft_val_loss_falls_and_resumes_exactly(tmp_path, pretrained, stopping):
    settings = {**QUIET, "train.max_steps": 6, "train.eval_every": 3, "optim.warmup_steps": 1}
    whole = tmp_path / "whole"
    plan = sft_plan(whole, pretrained, **settings)
    Trainer(plan.config, whole, echo=False).run()

    split = tmp_path / "split"
    first = Trainer(sft_plan(split, pretrained, **settings).config, split, echo=False)
    stopping(first, 1)  # asked for after step 1, taken at the end of step 2
    first.run()
    again = plan_run(split)  # running again into the directory continues it as an SFT run
    assert again.config.train.stage == "sft" and again.config.train.init == plan.config.train.init
    Trainer(again.config, split, resume_from=again.resume_from, echo=False).run()
    losses = {r["step"]: r["loss"] for r in metrics(whole) if "loss" in r}
    assert {r["step"]: r["loss"] for r in metrics(split) if "loss" in r} == losses and len(losses) == 6
    val = {r["step"]: r["val_loss"] for r in metrics(whole) if "val_loss" in r}
    assert {r["step"]: r["val_loss"] for r in metrics(split) if "val_loss" in r and r["step"] in val} == val
    assert val[6] < val[3] < val[0] - 0.3  # held-out answers' loss falls (measured: 5.65, 5.25, 5.13)
    with pytest.raises(UserError, match="is a sft run, not pretrain"):
        plan_run(split, stage="pretrain")


# -- learning to answer -------------------------------------------------------------------------
# The builtin grammar with a small lexicon (three words a slot, short stories, questions after
# every story), so a tiny model learns the answers in seconds rather than the hours the full
# lexicon needs on a CPU. `tinyllm.eval.qa` reads the held-out stories back from the shards, so
# it scores them as it scores the full corpus.
SMALL = Lexicon(
    openings=("Once upon a time,", "One day,"), traits=("little", "happy", "brave"),
    kinds=(("girl", "she"), ("boy", "he"), ("dog", None)),
    names=(("Mia", "she"), ("Lily", "she"), ("Tom", "he"), ("Ben", "he")),
    colours=("red", "blue", "green"), nouns=("kite", "ball", "hat"),
    places=(("in", "park"), ("at", "beach"), ("by", "lake")), feelings=("happy", "sad", "tired"),
    weathers=("sunny", "rainy"), utterances=("Let us play!", "Thank you!"), min_sentences=3, max_sentences=5,
    stop_prob=0.3, max_characters=2, max_objects=2, qa_share=1.0, more_question_prob=0.7, max_questions=3)
# Measured on the run below (2 layers x 128, 40 pretraining + 60 SFT steps; 2026-11-25, 2 CPU
# cores): 5 of 100 held-out questions answered exactly, and every answer in the answer form. The
# pretrained model answers none: it has not learned to stop at <|im_end|>. At this length the
# model has the form and the likeliest answers (it leans to colours after "What colour", but
# "A" still wins); reading the story takes longer runs (the cpu preset's figure in the README).
QA_FLOOR = 0.02


class SmallBuiltin(BuiltinSource):
    def identity(self) -> dict:
        return {**super().identity(), "corpus": BuiltinCorpus(seed=self.seed, lexicon=SMALL).identity}

    def documents(self, start: int = 0):
        return BuiltinCorpus(seed=self.seed, lexicon=SMALL).documents(start)


def test_sft_learns_to_answer_held_out_questions(tmp_path):
    data = tmp_path / "data"
    prepare([SmallBuiltin("builtin", 1.0, 0)], data, PrepareOptions(max_tokens=40_000, val_fraction=0.2, progress=False))
    model = {"model.block_size": 96, "model.n_embd": 128}
    pre = {**model, "data.dir": str(data), "train.max_steps": 40, "train.grad_accum": 1, "train.eval_every": 0,
           "train.sample_every": 0, "train.checkpoint_every": 0, "optim.lr": 3e-3}
    Trainer(resolve("tiny", overrides=[(k, v, "test") for k, v in pre.items()]), tmp_path / "pre", echo=False).run()
    pretrained, _, _ = load_model(tmp_path / "pre")
    assert qa_accuracy(pretrained, data, max_questions=30).correct == 0

    settings = {**QUIET, "train.max_steps": 60, "train.eval_every": 30, "train.qa_questions": 100}
    trainer = Trainer(sft_plan(tmp_path / "sft", tmp_path / "pre", **settings).config, tmp_path / "sft", echo=False)
    result = trainer.run()
    vals = [r["val_loss"] for r in metrics(tmp_path / "sft") if "val_loss" in r]
    assert vals[-1] < vals[0] - 1.0  # assistant tokens only
    answers = [e.answer.strip() for e in trainer.qa.examples]
    assert sum(bool(re.fullmatch(r"[A-Z][a-z ]*\.", a)) for a in answers) >= 0.9 * len(answers)  # the answer form
    assert result.qa_accuracy >= QA_FLOOR


def test_sft_on_the_builtin_corpus_reads_every_question_and_is_scored_on_the_sampled_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLLM_CACHE", str(tmp_path / "cache"))
    pre = {"data.builtin_tokens": 20_000, "model.block_size": 256, "train.max_steps": 1, "train.eval_every": 0,
           "train.sample_every": 0, "train.checkpoint_every": 0}
    Trainer(resolve("tiny", overrides=[(k, v, "test") for k, v in pre.items()]), tmp_path / "pre", echo=False).run()
    cfg = sft_plan(tmp_path / "sft", tmp_path / "pre", **{"train.qa_questions": 5}).config
    assert cfg.data.builtin_questions == "every"
    trainer = Trainer(cfg, tmp_path / "sft", echo=False)
    assert trainer.qa_dir == Trainer(read_config(tmp_path / "pre"), tmp_path / "pre2", echo=False).data_dir
    assert trainer.data_dir != trainer.qa_dir
    fixed = sft_plan(tmp_path / "sft2", tmp_path / "pre", **{"data.builtin_questions": "sampled"}).config
    assert Trainer(fixed, tmp_path / "sft2", echo=False).data_dir == trainer.qa_dir
