"""How one `tinyllm train` invocation relates to its run directory: start afresh or continue.

Why it is shaped this way: "continue" must mean the same thing whether the user passes
`--resume`, `--resume CHECKPOINT`, or simply runs again into a directory that has checkpoints.
In every case the config comes from the checkpoint being continued (not from the preset), flags
and `--config` may change how the rest of the run goes (steps, budget, intervals, learning
rate), and changes that would make the saved weights or data position meaningless (the model
shape, the data) are refused with the fix spelled out. A chat fine-tuning run (`--stage sft
--init RUN`) starts from another run's weights and config (`train.sft`); continued, it stays an
SFT run of those same weights.

The plan is also where the batch meets the number of processes: `train.batch_tokens` fixes the
tokens of an optimizer step over all of them, and `train.grad_accum` follows from it here, once,
before any process starts (`tinyllm train --nproc N` plans for N), so a batch that does not divide
is one line, and the trainer and the torchrun launcher take the planned config as it is.

A new run into a directory that holds a config.toml but no checkpoint does not replace that file
with another config (`_check_config_kept`): it is a user's, or a run's that stopped before its
first checkpoint. And a new pretraining run takes its width here when it will train in fp32
(`fit_width`, `train.fp32_width`), so the width it chose is in its config.toml from the start.

What a run directory holds, and its checkpoints, are `tinyllm.runtime` (`run_dir`, `checkpoint`):
inference reads them too; this planning is training's alone.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from tinyllm.config import DEFAULT_PRESET, Config, TrainConfig, read_toml, resolve
from tinyllm.errors import UserError
from tinyllm.runtime.checkpoint import find_checkpoint, latest_checkpoint, read_state, run_dir_of
from tinyllm.runtime.run_dir import CONFIG_FILE, held_for_training
from tinyllm.train.sft import sft_config


@dataclass
class RunPlan:
    config: Config
    run_dir: Path
    resume_from: Path | None  # the checkpoint to continue from; None starts afresh
    note: str | None = None  # a line for the user before training: a continuation whose batch changed


def default_run_dir(preset: str | None) -> Path:
    return Path("runs") / f"{preset or DEFAULT_PRESET}-{time.strftime('%Y%m%d-%H%M%S')}"


def plan_run(
    run_dir: str | Path | None,
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[tuple[str, Any, str]] | None = None,
    resume: str | None = None,
    stage: str | None = None,
    init: str | None = None,
    processes: int = 1,
) -> RunPlan:
    """Decide the config and the starting point of a run of `processes` processes.

    `resume`: None continues from the newest checkpoint when `run_dir` has one; "auto" (plain
    `--resume`) insists on one; any other value is a checkpoint or run directory to continue from.
    `stage` "sft" with `init` (a pretrained run or checkpoint) starts chat fine-tuning from those
    weights (`train.sft`); None keeps the stage of the run being continued, else pretrains.
    """
    overrides = overrides or []
    if init is not None and stage != "sft":
        raise UserError(f"--init {init} names the pretrained run to fine-tune: add --stage sft")
    if run_dir is None:
        if resume == "auto":
            raise UserError("--resume needs the run to continue: add --out RUN_DIR")
        # Continuing a given checkpoint writes into the run it belongs to.
        run_dir = run_dir_of(find_checkpoint(resume)) if resume else default_run_dir("sft" if stage == "sft" else preset)
    run_dir = Path(run_dir)
    source = _resume_point(run_dir, resume)
    note = None
    if source is None:
        cfg = _new_config(stage, init, preset, config_file, overrides)
        if cfg.train.stage == "pretrain" and not width_given(config_file, overrides):
            cfg, note = fit_width(cfg)
        _check_config_kept(run_dir, cfg, config_file)
    else:
        name = str(source / CONFIG_FILE)
        base = read_toml(name)
        if preset is not None and preset != base.get("preset"):
            raise UserError(
                f"{run_dir} was trained with preset {base.get('preset')!r}, not {preset!r}: drop --preset to "
                "continue it, or pick a new --out to start another run"
            )
        cfg = resolve(config_file=config_file, overrides=overrides, base=base, base_name=name)
        saved = resolve(base=base, base_name=name)
        _check_compatible(saved, cfg, source)
        _check_same_stage(saved, cfg, source, stage, init)
    _check_data_dir(cfg)
    grad_accum = accumulation_steps(cfg.train, cfg.model.block_size, processes)
    cfg = replace(cfg, train=replace(cfg.train, grad_accum=grad_accum))
    return RunPlan(cfg, run_dir, source, _batch_change(source, cfg, processes) if source else note)


def fit_width(cfg: Config) -> tuple[Config, str | None]:
    """`cfg` with the model `train.fp32_width` wide where it will train in fp32, and the line that says so.

    At the cpu preset's size the vocabulary projection (50,304 x width) is most of a step, so a
    narrower model takes more steps in the same minutes; where steps are slow (fp32 on a CPU) that
    learned more: 96 wide answered 164-172 of 200 held-out questions after the default chat
    fine-tuning (three runs) where 128 answered 149 on the same machine (README: Main job). The precision is
    decided here (`autocast_dtype`; "auto" times a GEMM) and recorded, so the run keeps it."""
    t, m = cfg.train, cfg.model
    if not t.fp32_width:
        return cfg, None
    head = m.n_embd // m.n_head
    if t.fp32_width < 0 or t.fp32_width % head:
        raise UserError(f"train.fp32_width ({t.fp32_width}) must be 0 or a positive multiple of the head size, "
                        f"model.n_embd / model.n_head = {head}")
    # torch: imported after the checks above, so a planning error needs none
    from tinyllm.runtime.device import autocast_dtype, pick_device, recorded_choice

    device = pick_device(t.device)
    if autocast_dtype(device, recorded_choice(device, t.dtype, t.auto_dtype)[0]) is not None:
        return cfg, None
    model = replace(m, n_embd=t.fp32_width, n_head=t.fp32_width // head)
    train = replace(t, auto_dtype="fp32") if t.dtype == "auto" else t
    note = (f"note: this run trains in fp32, where a narrower model learns more in the same minutes: "
            f"{model.n_embd} wide with {model.n_head} head{'s' if model.n_head > 1 else ''} instead of {m.n_embd} "
            "(train.fp32_width)")
    return replace(cfg, model=model, train=train), (note if model != m else None)


def width_given(config_file: str | Path | None, overrides: list[tuple[str, Any, str]]) -> bool:
    """Whether --config or --set names the model's width or heads: then it is kept as given."""
    keys = {"model.n_embd", "model.n_head"}
    if any(key in keys for key, _, _ in overrides):
        return True
    model = read_toml(config_file).get("model", {}) if config_file is not None else {}
    return "n_embd" in model or "n_head" in model


def _batch_change(source: Path, cfg: Config, processes: int) -> str | None:
    """Said when a continuation's global batch is not the one the run trained with: most often a
    run continued on another number of processes with train.batch_tokens unset (every preset's)."""
    state = read_state(source)
    step, tokens = int(state["step"]), int(state.get("tokens") or 0)
    t = cfg.train
    now = t.micro_batch * t.grad_accum * processes * cfg.model.block_size
    if step <= 0 or not tokens or tokens == step * now:
        return None
    was = int(state.get("tokens_per_step") or tokens // step)  # the last step's; older checkpoints: the mean
    if was == now:
        return None
    return (f"note: this run's last step (step {step:,}) took {was:,} tokens; on {processes} "
            f"process{'es' if processes > 1 else ''} a step takes {now:,}. To keep its batch, pass --batch-tokens {was}")


def accumulation_steps(train: TrainConfig, block_size: int, processes: int) -> int:
    """Micro-steps per optimizer step: train.grad_accum, or what makes train.batch_tokens with this many processes."""
    if not train.batch_tokens:
        return train.grad_accum
    per = train.micro_batch * block_size * processes
    if train.batch_tokens % per:
        fit = max(1, round(train.batch_tokens / per)) * per
        raise UserError(f"train.batch_tokens ({train.batch_tokens:,}) is not a multiple of micro_batch x "
                        f"model.block_size x processes ({train.micro_batch} x {block_size} x {processes} = {per:,}): "
                        f"set it to {fit}, or change train.micro_batch or the number of processes")
    return train.batch_tokens // per


def _new_config(stage: str | None, init: str | None, preset: str | None, config_file: str | Path | None,
                overrides: list[tuple[str, Any, str]]) -> Config:
    if stage != "sft":
        return resolve(preset, config_file, overrides)
    if init is None:
        raise UserError("--stage sft fine-tunes a pretrained model: add --init RUN_DIR (a run of tinyllm train)")
    if preset is not None:
        raise UserError(f"--preset does not apply to --stage sft: the model and its recipe come from --init {init}; "
                        "change settings with --config or --set")
    return sft_config(init, config_file=config_file, overrides=overrides)


# Written by the trainer and the plan, not chosen: a second try of the same command may differ in them.
_DERIVED = {"train": ("auto_dtype", "grad_accum")}


def _check_config_kept(run_dir: Path, cfg: Config, config_file: str | Path | None) -> None:
    """A new run is refused where it would replace a config.toml it was not given (one a user
    wrote, or a run's that stopped before its first checkpoint) with a different config: the
    file is theirs, and pointing a run at it suggests they meant to train from it."""
    path = run_dir / CONFIG_FILE
    if not path.is_file() or config_file is not None and Path(config_file).resolve() == path.resolve():
        return
    try:
        raw = read_toml(path)
        saved = resolve(base=raw, base_name=str(path))
    except UserError as e:  # not a config this version can read: still not ours to overwrite
        raise UserError(f"{e}; {run_dir} has no checkpoint, and a new run there would replace that file: "
                        "fix or delete it, or pick another --out") from None
    old, now = asdict(saved), asdict(cfg)
    for section, keys in _DERIVED.items():
        for key in keys:
            old[section].pop(key), now[section].pop(key)
    if old != now:  # else the same command again (after a stop before the first checkpoint)
        with held_for_training(run_dir):  # a run training there before its first checkpoint: say that
            pass
        raise UserError(f"{path} holds another config{_changes(raw, old, now)} and {run_dir} has no checkpoint: "
                        f"to train from it, add --config {path}; to replace it, delete it or pick another --out")


def _changes(raw: dict, old: dict, now: dict, most: int = 3) -> str:
    """" (key was -> now, ...)" over the keys the file sets (all of them in a file a run wrote)."""
    changes = [f"{key} {old[key]!r} -> {now[key]!r}" for key in ("preset",) if key in raw and old[key] != now[key]]
    changes += [f"{section}.{key} {old[section][key]!r} -> {now[section][key]!r}"
                for section, values in raw.items() if isinstance(values, dict) and section in now
                for key in values if key in now[section] and old[section][key] != now[section][key]]
    more = f", and {len(changes) - most} more" if len(changes) > most else ""
    return f" ({', '.join(changes[:most])}{more})" if changes else ""


def _resume_point(run_dir: Path, resume: str | None) -> Path | None:
    if resume is not None and resume != "auto":
        return find_checkpoint(resume)
    latest = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if latest is None and resume == "auto":
        raise UserError(f"--resume: {run_dir} has no checkpoint to continue from; drop --resume to start a new run there")
    return latest


def _check_compatible(saved: Config, new: Config, source: Path) -> None:
    """Refuse changes that the saved weights or the data position cannot follow."""
    for section in ("model", "data"):
        old, now = asdict(getattr(saved, section)), asdict(getattr(new, section))
        changed = [k for k in old if old[k] != now[k]]
        if changed:
            keys = ", ".join(f"{section}.{k} ({old[k]!r} -> {now[k]!r})" for k in changed)
            raise UserError(
                f"cannot continue {source} with a different {section} config: {keys}. Drop those settings to "
                "continue, or pick a new --out to start another run"
            )
    for key in ("micro_batch", "seed"):
        if getattr(saved.train, key) != getattr(new.train, key):
            raise UserError(
                f"cannot continue {source} with a different train.{key} (the data position depends on it): "
                "drop that setting, or pick a new --out"
            )


def _check_same_stage(saved: Config, new: Config, source: Path, stage: str | None, init: str | None) -> None:
    """A run continues as what it is: the same stage, fine-tuning the same weights."""
    was, now = saved.train, new.train
    if stage is not None and stage != was.stage or now.stage != was.stage:
        raise UserError(f"{source} is a {was.stage} run, not {stage or now.stage}: drop --stage to continue it, "
                        "or pick a new --out to start another run")
    asked = str(find_checkpoint(init).resolve()) if init is not None else now.init
    if asked != was.init:
        raise UserError(f"{source} was fine-tuned from {was.init}, not {asked}: drop --init to continue it, "
                        "or pick a new --out to start another run")


def _check_data_dir(cfg: Config) -> None:
    if cfg.data.dir and not Path(cfg.data.dir).is_dir():
        raise UserError(f"--data {cfg.data.dir}: no such directory; make one with tinyllm prepare, or omit --data "
                        "to use the built-in corpus")
