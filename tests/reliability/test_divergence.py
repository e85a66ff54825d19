"""NaN or Inf in the loss or the gradients: the step is skipped (no weight moves) and counted, the
count survives a resume, and `train.max_bad_steps` bad steps in a row stop the run with a message
naming the step, what to change, and the checkpoint to resume from.

(tests/train/test_trainer.py covers NaN losses in-process; these cover an Inf gradient behind a
finite loss, the count across a checkpoint, and a real divergence through the CLI.)
"""

from __future__ import annotations

import json
import math

import torch

from tinyllm.runtime.checkpoint import latest_checkpoint, load_model
from tinyllm.train.trainer import Trainer

from .conftest import TINY, assert_user_error, cli, tiny_config


def test_an_inf_gradient_behind_a_finite_loss_is_skipped_and_counted_across_a_resume(data, tmp_path):
    cfg = tiny_config(data, max_steps=6, checkpoint_every=3)
    trainer = Trainer(cfg, tmp_path, echo=False)
    weights = trainer.model.wte.weight  # tied to the head in the tiny preset: every step changes it
    snapshots = {}

    def poison(grad):  # only in the backward of step 2 (the counter moves on after it)
        return grad * math.inf if trainer.step == 1 else grad

    weights.register_hook(poison)
    original = trainer._after_step

    def watch(*args):
        snapshots[trainer.step] = weights.detach().clone()
        original(*args)

    trainer._after_step = watch
    trainer.run()
    assert trainer.skipped == 1 and trainer.step == 6
    assert torch.equal(snapshots[2], snapshots[1]) and not torch.equal(snapshots[3], snapshots[2])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in records if "loss" in r) == [1, 3, 4, 5, 6]  # step 2 has no loss to log
    assert "step 2: loss" in (tmp_path / "train_output.txt").read_text()

    state = json.loads((tmp_path / "checkpoints" / "step-00000003" / "state.json").read_text())
    assert (state["skipped_steps"], state["bad_in_row"]) == (1, 0)
    resumed = Trainer(tiny_config(data, max_steps=8, checkpoint_every=3), tmp_path, resume_from=latest_checkpoint(tmp_path),
                      echo=False)
    assert resumed.skipped == 1


def test_divergence_stops_the_cli_with_the_step_the_fix_and_the_checkpoint(data, tmp_path):
    run = tmp_path / "run"
    r = cli("train", *TINY, "--data", str(data), "--out", str(run), "--max-steps", "10", "--checkpoint-every", "1",
            "--set", "optim.lr=1e30", "--set", "optim.warmup_steps=0", "--set", "train.max_bad_steps=2")
    line = assert_user_error(r, "training diverged: 2 steps in a row had a NaN/Inf loss or gradient (up to step 3)",
                             "Lower optim.lr (now 1e+30)", "resume from the last checkpoint")
    # Step 2 was skipped, so its checkpoint holds step 1's weights; step 3 stopped the run before saving.
    assert str(latest_checkpoint(run)) in line and latest_checkpoint(run).name == "step-00000002"
    assert "step 2: loss nan / grad norm nan is not finite; step skipped (1 in a row, 1 in all)" in r.stdout
    model, _, _ = load_model(run)  # what it names is a checkpoint no NaN reached
    assert all(torch.isfinite(p).all() for p in model.parameters())
