"""How an invocation relates to a run directory: start afresh, continue, or refuse a change."""

from dataclasses import replace

import pytest
import torch

from tinyllm.config import resolve, save_toml
from tinyllm.errors import UserError
from tinyllm.model.gpt import GPT
from tinyllm.runtime.checkpoint import save_checkpoint
from tinyllm.train.optim import build_optimizer
from tinyllm.train.run_plan import accumulation_steps, plan_run


def make_run(run, data, steps=(2,)):
    cfg = resolve("tiny", overrides=[("data.dir", str(data), "test")])
    model = GPT(cfg.model)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    for step in steps:
        save_checkpoint(run, step, model=model, optimizer=opt, state={}, config=cfg, keep=5)
    return cfg


def test_a_new_directory_starts_afresh_from_the_preset(tmp_path):
    plan = plan_run(tmp_path / "run", preset="tiny", overrides=[("train.max_steps", "7", "--max-steps")])
    assert plan.resume_from is None and plan.config.preset == "tiny" and plan.config.train.max_steps == 7


def test_a_directory_with_checkpoints_continues_from_its_newest(tmp_path):
    cfg = make_run(tmp_path / "run", tmp_path, steps=(2, 4))
    plan = plan_run(tmp_path / "run", overrides=[("train.max_steps", "99", "--max-steps")])
    assert plan.resume_from.name == "step-00000004"
    assert plan.config.model == cfg.model and plan.config.train.max_steps == 99  # the rest may change


def test_resume_from_a_checkpoint_finds_its_run(tmp_path):
    make_run(tmp_path / "run", tmp_path, steps=(2, 4))
    plan = plan_run(None, resume=str(tmp_path / "run" / "checkpoints" / "step-00000002"))
    assert plan.run_dir == tmp_path / "run" and plan.resume_from.name == "step-00000002"


def test_continuing_refuses_a_different_model_or_preset(tmp_path):
    make_run(tmp_path / "run", tmp_path)
    with pytest.raises(UserError, match=r"different model config: model.n_layer \(2 -> 3\)"):
        plan_run(tmp_path / "run", overrides=[("model.n_layer", "3", "--set model.n_layer=3")])
    with pytest.raises(UserError, match="trained with preset 'tiny', not 'cpu'"):
        plan_run(tmp_path / "run", preset="cpu")
    with pytest.raises(UserError, match="different train.micro_batch"):
        plan_run(tmp_path / "run", overrides=[("train.micro_batch", "3", "--set train.micro_batch=3")])


def test_explicit_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="has no checkpoint to continue from"):
        plan_run(tmp_path, resume="auto")
    with pytest.raises(UserError, match="--resume needs the run to continue"):
        plan_run(None, resume="auto")


def test_batch_tokens_keeps_the_step_the_same_for_any_process_count(tmp_path):
    t = resolve("tiny", overrides=[("train.micro_batch", 2, "test"), ("train.batch_tokens", 256, "test")]).train
    assert [accumulation_steps(t, 32, n) for n in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(UserError, match=r"train.batch_tokens \(256\) is not a multiple of .* = 384.*set it to 384"):
        accumulation_steps(t, 32, 6)


def test_the_plan_derives_grad_accum_once_for_the_processes_it_plans(tmp_path):
    settings = [("train.micro_batch", 2, "test"), ("train.batch_tokens", 256, "test")]
    assert [plan_run(tmp_path, preset="tiny", overrides=settings, processes=n).config.train.grad_accum
            for n in (1, 2, 4)] == [4, 2, 1]
    assert plan_run(tmp_path, preset="tiny").config.train.grad_accum == resolve("tiny").train.grad_accum
    with pytest.raises(UserError, match=r"^train.batch_tokens \(100\) is not a multiple of micro_batch x "
                                        r"model.block_size x processes \(2 x 32 x 1 = 64\): set it to 128"):
        plan_run(tmp_path, preset="tiny", overrides=[*settings[:1], ("train.batch_tokens", 100, "test")])


def test_an_older_run_whose_config_names_data_context_continues(tmp_path):
    """Runs from before the context length had one name wrote data.context (0, or the block size)."""
    make_run(tmp_path / "run", tmp_path, steps=(2,))
    saved = tmp_path / "run" / "checkpoints" / "step-00000002" / "config.toml"
    saved.write_text(saved.read_text().replace("[data]\n", "[data]\ncontext = 32\n"))
    plan = plan_run(tmp_path / "run", overrides=[("train.max_steps", 9, "test")])
    assert plan.resume_from.name == "step-00000002" and plan.config.model.block_size == 32
    saved.write_text(saved.read_text().replace("context = 32", "context = 16"))
    with pytest.raises(UserError, match=f"^{saved}: data.context \\(16\\) differs from model.block_size \\(32\\)"):
        plan_run(tmp_path / "run")


def test_a_continuation_on_another_number_of_processes_says_its_batch_changed(tmp_path):
    # With train.batch_tokens unset (every preset), 2 processes continued alone train on half the
    # batch: the first line showed the new batch, nothing said it was not the run's.
    cfg = resolve("tiny", overrides=[("data.dir", str(tmp_path), "test")])
    model = GPT(cfg.model)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    per_process = cfg.train.micro_batch * cfg.train.grad_accum * cfg.model.block_size
    save_checkpoint(tmp_path / "run", 4, model=model, optimizer=opt, state={"tokens": 4 * 2 * per_process},
                    config=cfg, keep=5)
    assert plan_run(tmp_path / "run", processes=2).note is None  # the same batch: nothing to say
    note = plan_run(tmp_path / "run", processes=1).note
    assert note == (f"note: this run's last step (step 4) took {2 * per_process:,} tokens; on 1 "
                    f"process a step takes {per_process:,}. To keep its batch, pass --batch-tokens {2 * per_process}")
    kept = [("train.batch_tokens", 2 * per_process, "--batch-tokens")]
    assert plan_run(tmp_path / "run", processes=1, overrides=kept).note is None


def test_after_a_change_the_note_names_the_last_steps_batch_not_the_runs_mean(tmp_path):
    cfg = resolve("tiny", overrides=[("data.dir", str(tmp_path), "test")])
    model = GPT(cfg.model)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    per_process = cfg.train.micro_batch * cfg.train.grad_accum * cfg.model.block_size
    # 4 steps on 2 processes, then 2 alone: a mean of 5/3 processes' batch, which no one trained with.
    state = {"tokens": (4 * 2 + 2) * per_process, "tokens_per_step": per_process}
    save_checkpoint(tmp_path / "run", 6, model=model, optimizer=opt, state=state, config=cfg, keep=5)
    assert plan_run(tmp_path / "run", processes=1).note is None
    assert plan_run(tmp_path / "run", processes=2).note.endswith(f"pass --batch-tokens {per_process}")


def test_a_new_run_keeps_a_config_toml_it_was_not_given(tmp_path):
    # One the user wrote beside no checkpoint (or a run's that stopped before its first one) was replaced
    # by the preset's, silently, and the run trained another model than the file described.
    run = tmp_path / "run"
    run.mkdir()
    mine = "[model]\nn_layer = 6\n"
    (run / "config.toml").write_text(mine)
    with pytest.raises(UserError, match=r"model.n_layer 6 -> 2.*add --config .*config.toml.*delete it"):
        plan_run(run, preset="tiny")
    assert (run / "config.toml").read_text() == mine
    given = plan_run(run, preset="tiny", config_file=run / "config.toml")  # told to: trained from it
    assert given.config.model.n_layer == 6
    (run / "config.toml").write_text("[model\n")
    with pytest.raises(UserError, match="not valid TOML.*would replace that file"):
        plan_run(run, preset="tiny")


def test_the_same_command_again_before_a_first_checkpoint_starts_afresh(tmp_path):
    run = tmp_path / "run"
    flags = [("model.n_layer", "3", "--set"), ("train.batch_tokens", "1024", "--set")]
    first = plan_run(run, preset="tiny", overrides=flags, processes=2).config
    run.mkdir()
    # What the trainer writes there: the plan's config and the precision "auto" chose.
    save_toml(replace(first, train=replace(first.train, auto_dtype="fp32")), run / "config.toml")
    again = plan_run(run, preset="tiny", overrides=flags)  # on one process now: another grad_accum
    assert again.resume_from is None and again.config.model.n_layer == 3


def test_a_new_cpu_preset_run_in_fp32_is_narrower_and_says_so(tmp_path):
    plan = plan_run(tmp_path / "a", overrides=[("train.dtype", "fp32", "--set")])
    assert (plan.config.model.n_embd, plan.config.model.n_head) == (96, 3)  # heads of 32, as at 128
    assert plan.note.startswith("note: this run trains in fp32") and "96 wide with 3 heads instead of 128" in plan.note
    bf16 = plan_run(tmp_path / "b", overrides=[("train.dtype", "bf16", "--set")])
    assert (bf16.config.model.n_embd, bf16.note) == (128, None)


def test_an_auto_precision_is_decided_once_and_recorded_with_the_width(tmp_path, monkeypatch):
    from tinyllm.runtime import device

    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    plan = plan_run(tmp_path / "a")
    assert plan.config.model.n_embd == 96 and plan.config.train.auto_dtype == "fp32"


def test_a_width_the_user_chose_is_kept_in_fp32(tmp_path):
    fp32 = ("train.dtype", "fp32", "--set")
    plan = plan_run(tmp_path / "a", overrides=[fp32, ("model.n_embd", "256", "--set")])
    assert (plan.config.model.n_embd, plan.note) == (256, None)
    mine = tmp_path / "mine.toml"
    mine.write_text("[model]\nn_head = 2\n")
    assert plan_run(tmp_path / "b", config_file=mine, overrides=[fp32]).config.model.n_embd == 128


def test_a_continued_or_fine_tuned_run_keeps_its_width(tmp_path):
    fp32 = ("train.dtype", "fp32", "--set")
    cfg = resolve("cpu", overrides=[("data.dir", str(tmp_path), "test"), ("train.dtype", "bf16", "test")])
    model = GPT(cfg.model)
    save_checkpoint(tmp_path / "run", 2, model=model, optimizer=build_optimizer(model, cfg.optim, torch.device("cpu")),
                    state={}, config=cfg, keep=5)
    again = plan_run(tmp_path / "run", overrides=[fp32])  # begun where bf16 is fast, continued in fp32
    assert again.resume_from is not None and again.config.model.n_embd == 128
    sft = plan_run(tmp_path / "sft", stage="sft", init=str(tmp_path / "run"), overrides=[fp32])
    assert sft.config.model.n_embd == 128


def test_the_same_fp32_command_again_before_a_first_checkpoint_is_not_refused(tmp_path):
    first = plan_run(tmp_path / "run", overrides=[("train.dtype", "fp32", "--set")])
    (tmp_path / "run").mkdir()
    save_toml(first.config, tmp_path / "run" / "config.toml")
    assert plan_run(tmp_path / "run", overrides=[("train.dtype", "fp32", "--set")]).config == first.config


def test_a_width_that_is_not_whole_heads_is_one_line(tmp_path):
    for width in ("-96", "100"):
        with pytest.raises(UserError, match=f"train.fp32_width \\({width}\\) must be 0 or a positive multiple of the head size"):
            plan_run(tmp_path / width, overrides=[("train.fp32_width", width, "--set")])
