"""One typed run configuration, resolved as preset -> `--config FILE.toml` -> flags, then validated.

Why it is shaped this way:
- Four sections, one per component: `model` is the model's own `GPTConfig`, `data` goes to the
  loader, `optim` to the optimizer and schedule, `train` to the loop. Each component receives only
  its section, so none grows a dependency on the others' knobs.
- Layers are merged as plain nested dicts, and every key is checked (name, type) as its layer is
  merged, so an error names where the bad value came from (`--set`, the TOML file, the preset)
  and suggests the key that was probably meant. The dataclasses are built once, at the end, and
  checks that involve two fields (width vs heads) run then. What a single value may be (its type,
  command-line text, durations) is `config_values`, which knows no keys.
- Each value has one name. The context length is `model.block_size` (the model's weights depend on
  it; the loader cuts rows of that many tokens); older runs' `data.context` is read only to check
  that it agreed (`RETIRED`). Checks that need the number of processes (`train.batch_tokens`) are
  the run plan's (`tinyllm.train.run_plan`), made once before any process starts.
- The resolved config is written back as TOML (`tomlio`) into the run directory and every
  checkpoint, and `resolve(base=...)` reads it back to an equal config.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from tinyllm import fsio, tomlio
from tinyllm.config_values import coerce, parse_duration
from tinyllm.errors import UserError
from tinyllm.model.gpt import GPTConfig
from tinyllm.tokenizer import VOCAB_SIZE
from tinyllm.tomlio import read_toml

DEFAULT_PRESET = "cpu"


@dataclass
class DataConfig:
    """What the loader needs: where the tokens are and how rows are cut."""

    # A directory made by `tinyllm prepare`; "" prepares the built-in corpus into a cache.
    dir: str = ""
    # "packed": documents run together across rows; "padded": one document per row, padded.
    mode: Literal["packed", "padded"] = "packed"
    # How many tokens of the built-in corpus to prepare when `dir` is "".
    builtin_tokens: int = 5_000_000
    # Which questions follow the built-in stories: "sampled" (half the stories, 1 to 3 each: the
    # pretraining corpus) or "every" (every story, every question it settles up to 12: chat
    # fine-tuning's default). Held-out QA always asks the sampled corpus's questions.
    builtin_questions: Literal["sampled", "every"] = "sampled"
    # Which targets carry the loss: "all" tokens, or only the "assistant" tokens of ChatML
    # conversations (chat fine-tuning: the chat template's mask).
    loss_on: Literal["all", "assistant"] = "all"


@dataclass
class OptimConfig:
    """The optimizer (AdamW, or Muon for the hidden matrices) and its learning-rate schedule."""

    # "adamw" for every weight, or "muon": Muon (orthogonalised momentum) for the 2-D weights inside
    # the blocks, AdamW for embeddings, head, norms and biases. Muon's updates are scaled to
    # AdamW's RMS, so one `lr` and schedule drive both.
    optimizer: Literal["adamw", "muon"] = "adamw"
    lr: float = 3e-4
    # After warmup: "cosine" to the floor, "constant", or "wsd" (warmup-stable-decay: the peak
    # until the last decay_fraction of the run, then down to the floor). With train.max_time the
    # schedule follows the fraction of the budget spent, else the fraction of max_steps.
    schedule: Literal["cosine", "constant", "wsd"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio (the floor), on the last step
    decay_fraction: float = 0.35  # wsd: the last part of the run (a fraction of it), decaying to the floor
    weight_decay: float = 0.1
    # With muon: the lr of what AdamW trains (embeddings, head, norms, biases) / lr; AdamW alone: unused.
    adamw_lr_scale: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # the global gradient norm is clipped to this; 0: never
    fused: bool = True  # the fused AdamW kernel, where the device has one


@dataclass
class TrainConfig:
    """The loop: batch, length of the run, precision, and how often to evaluate, sample, save."""

    seed: int = 1337
    micro_batch: int = 16
    grad_accum: int = 4
    # The share of positions, drawn at random each step, whose next-token loss pretraining computes:
    # a skipped one costs no vocabulary projection. At 0.3 the `cpu` preset ran 2.1x the tokens in its
    # minutes but learned real text less (README: Main job). Validation always scores every position.
    loss_fraction: float = 1.0
    max_steps: int = 5000
    # Wall-clock budget ("90s", "10m", "2h", "1h30m"; "" or "none": none). The lr schedule then follows
    # the fraction spent (max_steps still caps it), reaching its floor on the last step that fits.
    max_time: str = ""
    # false: max_time only stops this process (a job's time limit, as under SLURM; a resumed run
    # gets the budget afresh) and the schedule follows max_steps. Older runs: fit_steps_to_time.
    budget_drives_schedule: bool = True
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    # "auto": bf16 autocast on CUDA with bf16 and on CPUs with native bf16 units, else fp32.
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    # What "auto" chose when the run started, written by the trainer into the run's config.toml
    # (a CPU times a GEMM, which can come out either way): a resume, or a run from that file,
    # keeps it instead of timing again. "" until then; read only while dtype is "auto".
    auto_dtype: Literal["", "bf16", "fp32"] = ""
    # A new pretraining run that will train in fp32 is this wide (heads keep their size), written into
    # model.n_embd, unless --config or --set chose the width (`run_plan.fit_width`). 0: never.
    fp32_width: int = 0
    compile: bool = False
    log_every: int = 10
    eval_every: int = 500
    eval_batches: int = 20
    sample_every: int = 1000
    # Prompts the samples during training continue; empty: the openings of the first few val
    # documents of the run's own data (tinyllm.data.prompts).
    sample_prompts: list[str] = field(default_factory=list)
    sample_tokens: int = 64
    # Multiple-choice tasks scored at every eval, as `tinyllm eval --task` takes them (hellaswag,
    # arc_easy, NAME=PATH, mc=PATH), on each one's first `eval_task_items` items; logged as
    # NAME_acc and NAME_acc_norm beside the val loss.
    eval_tasks: list[str] = field(default_factory=list)
    eval_task_items: int = 100
    sample_temperature: float = 0.8
    sample_top_k: int = 50
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    # Stop when this many steps in a row have a NaN/Inf loss or gradient.
    max_bad_steps: int = 5
    # Under torchrun: "ddp" (each process holds the whole model) or "fsdp" (FSDP2 shards weights,
    # gradients and optimizer state across processes, for models that do not fit one device).
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # Tokens per optimizer step over all processes; grad_accum is then derived from it (when the run
    # is planned), so a step stays the same whatever the number of processes.
    # 0: micro_batch x grad_accum x processes x model.block_size.
    batch_tokens: int = 0
    # "pretrain" starts from random weights; "sft" (chat fine-tuning) from the weights of `init`.
    stage: Literal["pretrain", "sft"] = "pretrain"
    # The checkpoint an sft run starts from (a run directory resolves to its newest checkpoint).
    init: str = ""
    # At the end of an sft run: exact-answer accuracy on this many held-out builtin questions; 0 skips it.
    qa_questions: int = 200


@dataclass
class Config:
    model: GPTConfig
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    # The preset this config started from (informational; resuming checks it).
    preset: str = ""


SECTIONS: dict[str, type] = {"model": GPTConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}
# Top-level keys that are not sections. `description` documents a preset and is dropped.
TOP_LEVEL = ("preset", "description")
# Keys that older runs' config.toml files hold, under the name that now means the same: fitting
# the schedule once to train.max_time gave way to the schedule following the time spent.
RENAMED = {("train", "fit_steps_to_time"): "budget_drives_schedule"}
# Keys that older runs' files hold for a value that now has another name, read only to check that
# they agree with it: `data.context` (tokens per row, 0 for the block size) is `model.block_size`.
RETIRED = {("data", "context"): ("model", "block_size")}


# -- presets ------------------------------------------------------------------------------------


def _presets_dir() -> Any:
    return resources.files("tinyllm").joinpath("presets")


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".toml")] for p in _presets_dir().iterdir() if p.name.endswith(".toml"))


def read_preset(name: str) -> dict:
    names = preset_names()
    if name not in names:
        raise UserError(f"unknown preset {name!r}{_did_you_mean(name, names)}: choose one of {', '.join(names)}")
    text = _presets_dir().joinpath(f"{name}.toml").read_text(encoding="utf-8")
    return tomlio.loads(text)


def list_presets() -> list[tuple[str, str]]:
    """(name, one-line description) for every shipped preset."""
    return [(n, str(read_preset(n).get("description", ""))) for n in preset_names()]


# -- resolution ---------------------------------------------------------------------------------


def resolve(
    preset: str | None = DEFAULT_PRESET,
    config_file: str | Path | None = None,
    overrides: typing.Sequence[tuple[str, Any, str]] = (),
    base: dict | None = None,
    base_name: str = "the run's config.toml",
) -> Config:
    """Build the validated config: `base` (or the preset) -> `config_file` -> `overrides`.

    `overrides` are (dotted key, value, source) triples; a `str` value from the command line is
    parsed as a TOML value when the field is not a string. `base` (a saved run's config, as a
    dict, read from the file `base_name` names in errors) replaces the preset when resuming.
    """
    merged = _defaults()
    if base is not None:
        _merge(merged, base, base_name)
    else:
        name = preset or DEFAULT_PRESET
        _merge(merged, read_preset(name), f"preset {name!r}")
        merged["preset"] = name
    if config_file is not None:
        _merge(merged, read_toml(config_file), str(config_file))
    for key, value, source in overrides:
        section, name = _split_key(key, source)
        if (section, name) in RETIRED:
            now = ".".join(RETIRED[section, name])
            raise UserError(f"{source}: {key} is no longer a setting: use {now} instead (--set {now}={value})")
        _merge(merged, {section: {name: value}}, source)
    return _build(merged)


def parse_set(item: str) -> tuple[str, str]:
    """`section.key=value` from `--set` -> (key, raw value)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {item!r}: expected section.key=value, e.g. --set optim.lr=1e-3")
    return key.strip(), value.strip()


def _defaults() -> dict:
    out: dict = {"preset": ""}
    for name, cls in SECTIONS.items():
        out[name] = {f.name: _field_default(f) for f in dataclasses.fields(cls)}
    return out


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise AssertionError(f"config field {f.name} has no default")


def _split_key(key: str, source: str) -> tuple[str, str]:
    section, dot, name = key.partition(".")
    if not dot:
        raise UserError(f"{source}: key {key!r} needs a section, e.g. optim.lr{_did_you_mean_key(key)}")
    return section, name


def _merge(into: dict, layer: dict, source: str) -> None:
    retired: list[tuple[str, str, Any]] = []
    for key, value in layer.items():
        if key in TOP_LEVEL:
            if key == "preset":
                into["preset"] = coerce(value, str, "preset", source)
            continue
        if key not in SECTIONS:
            hint = _did_you_mean(key, list(SECTIONS)) or _did_you_mean_key(key)
            raise UserError(f"{source}: unknown section {key!r}{hint}; sections are {', '.join(SECTIONS)}")
        if not isinstance(value, dict):
            raise UserError(f"{source}: {key} must be a table ([{key}]), got a {type(value).__name__}")
        hints = typing.get_type_hints(SECTIONS[key])
        for name, v in value.items():
            name = RENAMED.get((key, name), name)
            if (key, name) in RETIRED:
                retired.append((key, name, v))
            elif name not in hints:
                raise UserError(f"{source}: unknown key {key}.{name}{_did_you_mean_key(f'{key}.{name}')}")
            else:
                into[key][name] = coerce(v, hints[name], f"{key}.{name}", source)
    for key, name, v in retired:  # after the whole layer: it may set the new key after the old one
        _check_retired(into, key, name, v, source)


def _check_retired(merged: dict, section: str, name: str, value: Any, source: str) -> None:
    """A retired key loads (and is dropped) when it says what the key now named for it says, or 0 ("the same")."""
    key = f"{section}.{name}"
    now_section, now_name = RETIRED[section, name]
    now = merged[now_section][now_name]
    if coerce(value, int, key, source) not in (0, now):
        raise UserError(f"{source}: {key} ({value}) differs from {now_section}.{now_name} ({now}), and {key} is no "
                        f"longer a setting: use {now_section}.{now_name} instead and drop {key}")


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _did_you_mean_key(word: str) -> str:
    """Suggest the closest full `section.key`, matching on the bare key name too (`lr` -> optim.lr)."""
    full = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    hit = difflib.get_close_matches(word, full, n=1, cutoff=0.6)
    if not hit:
        bare = word.rpartition(".")[2]
        by_name = {k.rpartition(".")[2]: k for k in full}
        names = difflib.get_close_matches(bare, list(by_name), n=1, cutoff=0.75)
        hit = [by_name[names[0]]] if names else []
    return f" (did you mean {hit[0]}?)" if hit else ""


# -- building and validating --------------------------------------------------------------------


def _build(merged: dict) -> Config:
    try:
        model = GPTConfig(**merged["model"])
    except ValueError as e:  # GPTConfig names the field in its message
        raise UserError(str(e)) from None
    cfg = Config(
        model=model,
        data=DataConfig(**merged["data"]),
        optim=OptimConfig(**merged["optim"]),
        train=TrainConfig(**merged["train"]),
        preset=merged["preset"],
    )
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that span fields; each message names the fields and how to fix them."""
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    if m.vocab_size < VOCAB_SIZE:
        raise UserError(f"model.vocab_size ({m.vocab_size}) is smaller than the tokenizer's {VOCAB_SIZE} ids: set it to {VOCAB_SIZE}")
    _positive(t, "micro_batch", "grad_accum", "max_steps", "eval_batches", "keep_checkpoints", "max_bad_steps", "log_every")
    _non_negative(t, "seed", "eval_every", "sample_every", "sample_tokens", "checkpoint_every", "sample_top_k", "qa_questions")
    if t.stage == "sft" and not t.init:
        raise UserError("train.stage sft fine-tunes a pretrained model: name it with --init RUN_DIR")
    if t.stage == "pretrain" and t.init:
        raise UserError(f"train.init ({t.init}) is only read by chat fine-tuning: add --stage sft, or drop --init")
    _non_negative(o, "warmup_steps", "weight_decay", "grad_clip")
    _non_negative(t, "batch_tokens")  # its fit to the batch shape and process count: `train.run_plan`
    _non_negative(d, "builtin_tokens")
    for name in ("lr", "adamw_lr_scale"):
        if not getattr(o, name) > 0 or not math.isfinite(getattr(o, name)):
            raise UserError(f"optim.{name} must be a positive number, got {getattr(o, name)}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise UserError(f"optim.min_lr_ratio must be between 0 and 1 (the floor as a fraction of lr), got {o.min_lr_ratio}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(o, name) < 1:
            raise UserError(f"optim.{name} must be in [0, 1), got {getattr(o, name)}")
    if not 0 < t.loss_fraction <= 1:
        raise UserError(f"train.loss_fraction must be in (0, 1] (the share of positions scored), got {t.loss_fraction}")
    if t.sample_temperature < 0:
        raise UserError(f"train.sample_temperature must be >= 0 (0 is greedy), got {t.sample_temperature}")
    if not 0 < o.decay_fraction <= 1:
        raise UserError(f"optim.decay_fraction must be in (0, 1] (the part of the run spent decaying), "
                        f"got {o.decay_fraction}")
    time_budget(t)  # raises on an unreadable duration


def _positive(section: Any, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 1:
            raise UserError(f"{_section_name(section)}.{name} must be at least 1, got {getattr(section, name)}")


def _non_negative(section: Any, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 0:
            raise UserError(f"{_section_name(section)}.{name} must be >= 0, got {getattr(section, name)}")


def _section_name(section: Any) -> str:
    return next(n for n, cls in SECTIONS.items() if isinstance(section, cls))


def time_budget(train: TrainConfig) -> float | None:
    """`train.max_time` in seconds, or None when there is no budget."""
    text = train.max_time.strip().lower()
    return None if text in ("", "none") else parse_duration(text, "train.max_time")


# -- TOML out -----------------------------------------------------------------------------------


def to_dict(cfg: Config) -> dict:
    out: dict = {"preset": cfg.preset}
    for name in SECTIONS:
        out[name] = dataclasses.asdict(getattr(cfg, name))
    return out


def to_toml(cfg: Config) -> str:
    """The config as TOML that `resolve(base=read_toml(...))` reads back to an equal config."""
    return tomlio.dumps(to_dict(cfg), header="Resolved tinyllm config: preset -> config file -> flags.")


def save_toml(cfg: Config, path: str | Path) -> None:
    """Write the config; a crash mid-write leaves the previous file whole."""
    fsio.atomic_write_text(path, to_toml(cfg))
