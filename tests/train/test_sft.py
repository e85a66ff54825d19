"""Chat fine-tuning: starts from a pretrained run, puts the loss on assistant tokens only, learns to
answer, and resumes exactly.

One tiny model is pretrained once for the module (the `tiny` preset at context 64, where most
builtin stories with questions fit whole) and every test fine-tunes it.
"""

import copy
import json

import pytest
import torch

from tinyllm.config import resolve
from tinyllm.data.prepare import PrepareOptions, prepare
from tinyllm.data.sources import resolve_sources
from tinyllm.errors import UserError
from tinyllm.eval.loss import evaluate_loss
from tinyllm.tokenizer import IM_END, IM_START, PAD, get_tokenizer
from tinyllm.train.checkpoint import latest_checkpoint, read_config
from tinyllm.train.run_dir import plan_run
from tinyllm.train.trainer import Trainer

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
    settings = {"data.dir": data, "model.block_size": CONTEXT, "data.context": CONTEXT, "train.max_steps": PRETRAIN_STEPS,
                "train.grad_accum": 1, "train.eval_every": 0, "train.sample_every": 0, "train.checkpoint_every": 0,
                "optim.lr": 1e-2}
    run = tmp_path_factory.mktemp("pretrained")
    Trainer(resolve("tiny", overrides=[(k, v, "test") for k, v in settings.items()]), run, echo=False).run()
    return run


def sft_plan(run_dir, pretrained, **settings):
    overrides = [(k, v, "test") for k, v in settings.items()]
    return plan_run(run_dir, stage="sft", init=str(pretrained), overrides=overrides)


QUIET = {"train.eval_every": 0, "train.qa_questions": 0, "train.checkpoint_every": 0, "train.max_time": "none",
         "train.fit_steps_to_time": False, "train.micro_batch": 4, "train.eval_batches": 4}


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
    untrained = copy.deepcopy(trainer.model)
    seen, forward = [], trainer.forward
    trainer.forward = lambda x, y: seen.append((x, y)) or forward(x, y)
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
        token_mean = sum(untrained(x, y).item() * n for (x, y), n in zip(seen[:2], counts, strict=True)) / sum(counts)
    assert first["loss"] == pytest.approx(token_mean, rel=1e-5)


def test_micro_batches_are_weighted_by_their_targets(tmp_path, pretrained):
    """Accumulating two padded micro-batches gives the gradient of one batch holding both."""
    settings = {**QUIET, "train.max_steps": 1, "train.grad_accum": 2, "optim.grad_clip": 0.0}
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
    assert (batches[0].targets != -1).sum() != (batches[1].targets != -1).sum()  # unequal, so weighting matters
    reference(x, y).backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-7)


def test_periodic_val_loss_agrees_with_tinyllm_eval(tmp_path, pretrained):
    cfg = sft_plan(tmp_path, pretrained, **QUIET).config
    trainer = Trainer(cfg, tmp_path, echo=False)
    full = evaluate_loss(trainer.model, cfg.data.dir, batch_size=cfg.train.micro_batch, context=cfg.context,
                         max_batches=cfg.train.eval_batches, mode="padded", loss_on="assistant")
    assert trainer.evaluate() == pytest.approx(full.loss, rel=1e-6)


def test_sft_resumes_exactly(tmp_path, pretrained):
    settings = {**QUIET, "train.max_steps": 6, "train.eval_every": 3}
    whole = tmp_path / "whole"
    plan = sft_plan(whole, pretrained, **settings)
    Trainer(plan.config, whole, echo=False).run()

    split = tmp_path / "split"
    first = Trainer(sft_plan(split, pretrained, **settings).config, split, echo=False)
    original = first._after_step

    def stop_at_2(*args):
        original(*args)
        if first.step == 2:
            first.stop()

    first._after_step = stop_at_2
    first.run()
    again = plan_run(split)  # running again into the directory continues it as an SFT run
    assert again.config.train.stage == "sft" and again.config.train.init == plan.config.train.init
    Trainer(again.config, split, resume_from=again.resume_from, echo=False).run()
    losses = {r["step"]: r["loss"] for r in metrics(whole) if "loss" in r}
    assert {r["step"]: r["loss"] for r in metrics(split) if "loss" in r} == losses and len(losses) == 6
    val = {r["step"]: r["val_loss"] for r in metrics(whole) if "val_loss" in r}
    assert {r["step"]: r["val_loss"] for r in metrics(split) if "val_loss" in r and r["step"] in val} == val
    with pytest.raises(UserError, match="is a sft run, not pretrain"):
        plan_run(split, stage="pretrain")
