"""Config resolution: preset -> file -> flags, validation messages, and the TOML round trip."""

import dataclasses

import pytest

from tinyllm.config import (
    list_presets,
    parse_duration,
    parse_set,
    preset_names,
    read_toml,
    resolve,
    save_toml,
    time_budget,
)
from tinyllm.errors import UserError
from tinyllm.model.gpt import GPT


def cli(key: str, value: str) -> tuple[str, str, str]:
    return key, value, f"--set {key}={value}"


def test_every_shipped_preset_resolves_and_describes_itself():
    names = preset_names()
    assert {"seed", "cpu", "tiny", "modern"} <= set(names)
    assert all(desc for _, desc in list_presets())
    for name in names:
        assert resolve(name).preset == name


def test_seed_preset_is_the_reference_recipe():
    cfg = resolve("seed")
    m, o, t = cfg.model, cfg.optim, cfg.train
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size) == (8, 8, 512, 512, 50260)
    assert (o.lr, o.schedule) == (3e-4, "cosine")
    assert (t.dtype, t.micro_batch, t.grad_accum, t.checkpoint_every) == ("bf16", 16, 4, 5000)
    assert t.sample_every > 0 and m.block_size == 512


def test_modern_preset_builds_a_modern_model():
    m = resolve("modern").model
    assert (m.pos_emb, m.norm, m.qk_norm, m.tie_embeddings) == ("rope", "rmsnorm", True, False)
    assert m.mlp in ("relu2", "swiglu")


def test_later_layers_override_earlier_ones(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[optim]\nlr = 0.002\n[train]\nmax_steps = 7\n")
    cfg = resolve("tiny", f, [cli("train.max_steps", "9"), cli("model.norm", "rmsnorm")])
    assert cfg.optim.lr == 0.002  # from the file
    assert cfg.train.max_steps == 9  # the flag beats the file
    assert cfg.model.norm == "rmsnorm"  # bare string from the command line
    assert cfg.model.n_layer == resolve("tiny").model.n_layer  # untouched preset value


def test_cli_values_are_parsed_as_toml():
    cfg = resolve("tiny", overrides=[cli("model.bias", "false"), cli("optim.lr", "1e-3"),
                                     cli("train.sample_prompts", '["A", "B c"]'), cli("optim.warmup_steps", "3")])
    assert cfg.model.bias is False and cfg.optim.lr == 1e-3 and cfg.train.sample_prompts == ["A", "B c"]
    assert isinstance(cfg.optim.lr, float) and cfg.optim.warmup_steps == 3


def test_int_is_accepted_where_a_float_is_expected():
    assert resolve("tiny", overrides=[cli("optim.lr", "1")]).optim.lr == 1.0


def test_typo_in_key_suggests_the_right_one():
    with pytest.raises(UserError, match=r"unknown key optim\.lrr.*did you mean optim\.lr\?"):
        resolve("tiny", overrides=[cli("optim.lrr", "1e-3")])


def test_key_in_wrong_section_suggests_its_section():
    with pytest.raises(UserError, match=r"did you mean optim\.weight_decay\?"):
        resolve("tiny", overrides=[cli("train.weight_decay", "0.1")])


def test_typo_in_file_section_names_the_file_and_suggests(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[optm]\nlr = 0.1\n")
    with pytest.raises(UserError, match=r"bad\.toml.*unknown section 'optm'.*did you mean optim"):
        resolve("tiny", f)


def test_wrong_type_names_key_expected_type_and_source():
    with pytest.raises(UserError, match=r"--set model\.n_layer=four: model\.n_layer must be an integer"):
        resolve("tiny", overrides=[cli("model.n_layer", "four")])
    with pytest.raises(UserError, match=r"train\.dtype must be one of"):
        resolve("tiny", overrides=[cli("train.dtype", "fp8")])
    with pytest.raises(UserError, match=r"must be true or false"):
        resolve("tiny", overrides=[cli("model.bias", "1")])


def test_width_not_divisible_by_heads_is_rejected():
    with pytest.raises(UserError, match=r"n_embd \(30\) must be divisible by model\.n_head \(4\)"):
        resolve("tiny", overrides=[cli("model.n_embd", "30"), cli("model.n_head", "4")])


def test_the_context_length_has_one_name_and_the_old_one_is_a_pointer_to_it():
    with pytest.raises(UserError, match=r"^--set data\.context=128: data\.context is no longer a setting: use "
                                        r"model\.block_size instead \(--set model\.block_size=128\)$"):
        resolve("tiny", overrides=[cli("data.context", "128")])
    assert not hasattr(resolve("tiny").data, "context")


@pytest.mark.parametrize("context", [0, 48])
def test_an_older_file_whose_data_context_agrees_with_the_block_size_loads(tmp_path, context):
    f = tmp_path / "config.toml"  # [data] first: the check waits for the file's own model.block_size
    f.write_text(f"[data]\ncontext = {context}\n[model]\nblock_size = 48\n")
    assert resolve("tiny", f).model.block_size == 48


def test_an_older_file_whose_data_context_differs_names_the_file_and_the_fix(tmp_path):
    f = tmp_path / "config.toml"
    f.write_text("[data]\ncontext = 16\n")
    with pytest.raises(UserError) as e:
        resolve("tiny", f)
    assert str(e.value) == (f"{f}: data.context (16) differs from model.block_size (32), and data.context is no "
                            "longer a setting: use model.block_size instead and drop data.context")


@pytest.mark.parametrize(("key", "value", "message"), [
    ("train.micro_batch", "0", r"train\.micro_batch must be at least 1"),
    ("train.seed", "-1", r"train\.seed must be >= 0"),  # numpy's generators refuse it mid-run
    ("optim.lr", "-1", r"optim\.lr must be a positive number"),
    ("optim.adamw_lr_scale", "0", r"optim\.adamw_lr_scale must be a positive number"),
    ("optim.min_lr_ratio", "2", r"min_lr_ratio must be between 0 and 1"),
    ("optim.decay_fraction", "0", r"optim\.decay_fraction must be in \(0, 1\]"),
    ("optim.schedule", "linear", r"optim\.schedule"),
    ("train.max_time", "ten minutes", r"cannot read 'ten minutes' as a duration"),
    ("model.vocab_size", "100", r"vocab_size \(100\) is smaller than the tokenizer's 50260"),
])
def test_impossible_values_are_rejected(key, value, message):
    with pytest.raises(UserError, match=message):
        resolve("tiny", overrides=[cli(key, value)])


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(UserError, match=r"unknown preset 'tinny' \(did you mean tiny\?\)"):
        resolve("tinny")


def test_missing_and_broken_config_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_toml(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(UserError, match="not valid TOML"):
        read_toml(bad)


def test_saved_toml_reads_back_to_the_same_config(tmp_path):
    cfg = resolve("modern", overrides=[cli("train.sample_prompts", '["He said \\"hi\\"\\n", "naïve\\ttab"]'),
                                       cli("data.dir", "/tmp/some dir")])
    path = tmp_path / "config.toml"
    save_toml(cfg, path)
    again = resolve(base=read_toml(path))
    assert again == cfg and dataclasses.asdict(again.train) == dataclasses.asdict(cfg.train)


def test_every_preset_builds_a_model_of_the_expected_size():
    assert 40e6 < GPT(resolve("seed").model).num_params() < 60e6  # ~51M with the tied 50,304 x 512 table
    assert GPT(resolve("tiny").model).num_params() < 2e6


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("10m", 600), ("2h", 7200), ("1h30m", 5400),
                                               ("1.5h", 5400), ("45", 45)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_set_needs_an_equals_sign():
    with pytest.raises(UserError, match="expected section.key=value"):
        parse_set("optim.lr")
    assert parse_set(" optim.lr = 3e-4 ") == ("optim.lr", "3e-4")


def test_no_time_budget_can_be_asked_for():
    for raw in ('""', "none"):
        cfg = resolve("cpu", overrides=[cli("train.max_time", raw)])
        assert time_budget(cfg.train) is None
    assert time_budget(resolve("cpu", overrides=[cli("train.max_time", "2h")]).train) == 7200


@pytest.mark.parametrize("fitted", [True, False])
def test_an_older_runs_config_with_fit_steps_to_time_loads_with_the_same_meaning(tmp_path, fitted):
    saved = tmp_path / "config.toml"
    save_toml(resolve("cpu"), saved)
    old = read_toml(saved)
    del old["train"]["budget_drives_schedule"], old["optim"]["decay_fraction"]
    old["train"]["fit_steps_to_time"] = fitted  # what runs wrote before a budget drove the schedule
    old["optim"]["schedule"] = "cosine"
    cfg = resolve(base=old)
    assert cfg.train.budget_drives_schedule is fitted and cfg.optim.schedule == "cosine"
    assert cfg.train.max_time == "9m" and "fit_steps_to_time" not in read_toml(saved)["train"]


def test_the_cpu_preset_with_adamw_alone_resolves():
    # The preset sets optim.adamw_lr_scale for its Muon; bench quality's gpt2 and modern variants,
    # and users, switch the optimizer to AdamW alone, where the setting has nothing to scale.
    cfg = resolve("cpu", overrides=[("optim.optimizer", "adamw", "--set optim.optimizer=adamw")])
    assert cfg.optim.optimizer == "adamw" and cfg.optim.adamw_lr_scale == 2.0
