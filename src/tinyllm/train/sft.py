"""Chat fine-tuning (SFT): its config, layered over the pretrained run's, and its starting weights.

Why it is shaped this way:
- An SFT run continues a pretrained model, so its config starts from that run's saved config
  (the model section above all: the user need not repeat it, and it cannot drift from the
  weights), then the SFT defaults below, then `--config` and flags as in any run. The data
  section is inherited too, so with no `--data` SFT reads the very builtin cache pretraining
  used, whose shards carry the assistant masks; the loss goes only on assistant tokens.
- Only the weights come from the init checkpoint: optimizer, schedule, data position and step
  count start afresh. The checkpoint is recorded as `train.init` (resolved, so a run directory
  that later grows newer checkpoints still names the weights used). Resuming an SFT run restores
  its own checkpoint and never reads `init` again, which is what keeps resuming exact.
- The defaults are a layer here rather than a preset: a preset stands alone (`--preset`), these
  only mean something over a pretrained run. The learning rate is a fraction of the pretrained
  run's peak, so it suits whichever recipe the model came from; a fine-tuned run fine-tuned
  again (on other chat data) keeps its own rate.
- Its end-of-run score, exact answers to held-out questions, is `tinyllm.eval.qa.held_out_qa`:
  the same scoring `tinyllm eval --qa` uses, in one place.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from pathlib import Path

from torch import nn

from tinyllm.config import Config, read_toml, resolve
from tinyllm.errors import UserError
from tinyllm.runtime.checkpoint import find_checkpoint, load_model

# SFT's peak learning rate as a fraction of the pretrained run's peak: fine-tuning adjusts a
# trained model rather than building one. On the cpu preset's model (peak 3e-3, so 9e-4 here)
# the assistant-token val loss fell 1.39 -> 1.02 in 42 steps with no spike; a third and three
# times this answered fewer held-out questions (README: Chat fine-tuning).
LR_SCALE = 0.3
# Applied over the pretrained run's config. Padded rows keep each story with its questions (a
# packed window may start after the story it asks about). The budget drives the schedule, so it
# is used to its end, and is what is left of the 15 minutes a user waits for the whole pipeline
# after the cpu preset's 9; max_steps caps it on faster machines (a GPU), not on a 2-core CPU
# (the cpu preset's model took 2,000 steps in 4m21s on a Zen 4 in bf16, when that was the cap).
# The val loss every 250 steps, not 50: each measurement (16 batches) took ~1 s of the 5 minutes,
# and measuring less gave 1,547 steps instead of 1,413 on a Zen 4 in bf16. One lr for every weight,
# as in the SFT runs that chose these (the pretrained run's adamw_lr_scale is pretraining's).
SFT_DEFAULTS: dict[str, dict[str, typing.Any]] = {
    "data": {"loss_on": "assistant", "mode": "padded", "builtin_questions": "every"},
    "optim": {"schedule": "cosine", "warmup_steps": 10, "min_lr_ratio": 0.1, "adamw_lr_scale": 1.0},
    "train": {"max_steps": 5000, "max_time": "5m", "eval_every": 250, "loss_fraction": 1.0,
              "eval_batches": 16, "sample_every": 0, "checkpoint_every": 100, "qa_questions": 200},
}
# Model settings that do not change the weights' shapes or meaning, so fine-tuning may change them.
_FREE_MODEL_KEYS = ("dropout",)


def sft_config(init: str | Path, *, config_file: str | Path | None = None,
               overrides: typing.Sequence[tuple[str, typing.Any, str]] = ()) -> Config:
    """The config of a new SFT run from `init` (a pretrained run directory or checkpoint)."""
    ckpt = find_checkpoint(init).resolve()
    pretrained = read_toml(ckpt / "config.toml")
    base = copy.deepcopy(pretrained)
    for section, values in SFT_DEFAULTS.items():
        base.setdefault(section, {}).update(values)
    # A fine-tuned run's rate is already SFT's: scaled again, each further round would learn 0.3x slower.
    scale = 1.0 if pretrained.get("train", {}).get("stage") == "sft" else LR_SCALE
    base["optim"]["lr"] = float(pretrained.get("optim", {}).get("lr", 3e-4)) * scale
    base["train"].update(stage="sft", init=str(ckpt))
    name = str(ckpt / "config.toml")
    cfg = resolve(config_file=config_file, overrides=overrides, base=base, base_name=name)
    _check_same_model(resolve(base=pretrained, base_name=name).model, cfg.model, ckpt)
    return cfg


def _check_same_model(pretrained: typing.Any, new: typing.Any, ckpt: Path) -> None:
    old, now = dataclasses.asdict(pretrained), dataclasses.asdict(new)
    changed = [k for k in old if old[k] != now[k] and k not in _FREE_MODEL_KEYS]
    if changed:
        keys = ", ".join(f"model.{k} ({old[k]!r} -> {now[k]!r})" for k in changed)
        raise UserError(f"fine-tuning keeps the shape of the model in {ckpt}: drop {keys}")


def load_init_weights(model: nn.Module, init: str | Path) -> Path:
    """Copy the weights of checkpoint `init` into `model` (in place); returns the checkpoint."""
    pretrained, _, ckpt = load_model(init)
    try:
        model.load_state_dict(pretrained.state_dict())
    except RuntimeError as e:
        raise UserError(f"the weights in {ckpt} do not fit this model (was model.* changed?): {e}") from None
    return ckpt
