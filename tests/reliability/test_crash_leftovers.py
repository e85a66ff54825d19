"""What a crash at an unlucky moment leaves in `checkpoints/`, and that none of it is ever taken
for a complete checkpoint or loses one: a kill while an old checkpoint is being deleted, a kill
between the two renames that replace a checkpoint saved twice at the same step, and a kill
while a resume moves newer checkpoints aside.
"""

from __future__ import annotations

import pytest
import torch

import tinyllm.runtime.checkpoint as ckpt
from tinyllm.config import resolve
from tinyllm.model.gpt import GPT
from tinyllm.train.optim import build_optimizer

FILES = sorted(["model.safetensors", "optimizer.pt", "rng.pt", "state.json", "config.toml"])


@pytest.fixture(scope="module")
def parts():
    cfg = resolve("tiny")
    torch.manual_seed(0)
    model = GPT(cfg.model)
    return cfg, model, build_optimizer(model, cfg.optim, torch.device("cpu"))


def save(run, step, parts, keep=2, **state):
    cfg, model, opt = parts
    return ckpt.save_checkpoint(run, step, model=model, optimizer=opt, state={"tokens": step, **state}, config=cfg,
                                keep=keep)


def assert_complete_and_loadable(run, parts) -> list[int]:
    cfg, _, _ = parts
    steps = []
    for path in ckpt.list_checkpoints(run):
        assert sorted(p.name for p in path.iterdir()) == FILES
        model = GPT(cfg.model)
        steps.append(ckpt.load_training_state(path, model, build_optimizer(model, cfg.optim, "cpu"))["step"])
    return steps


def test_a_kill_while_pruning_never_leaves_a_half_deleted_checkpoint(tmp_path, parts, monkeypatch):
    save(tmp_path, 1, parts)
    save(tmp_path, 2, parts)
    real_rmtree = ckpt.shutil.rmtree

    def killed_halfway(path, *args, **kwargs):
        if not path.exists():
            return real_rmtree(path, *args, **kwargs)
        next(p for p in path.iterdir()).unlink()  # one file of the pruned checkpoint gone, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 3, parts)  # step 3 is complete; pruning step 1 is cut short
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    assert assert_complete_and_loadable(tmp_path, parts) == [2, 3]
    save(tmp_path, 4, parts)  # the next save clears what the dead process left
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000003", "step-00000004"]


def test_a_kill_between_the_renames_of_a_resave_keeps_the_checkpoint(tmp_path, parts, monkeypatch):
    save(tmp_path, 5, parts, note="first")
    real_rename = ckpt.Path.rename

    def killed_after_setting_aside(self, target):
        moved = real_rename(self, target)
        if target.name.startswith(".old-"):
            raise KeyboardInterrupt  # the old one is set aside, the new one not yet in its place
        return moved

    monkeypatch.setattr(ckpt.Path, "rename", killed_after_setting_aside)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 5, parts, note="second")
    monkeypatch.setattr(ckpt.Path, "rename", real_rename)
    assert not (tmp_path / "checkpoints" / "step-00000005").exists()
    # The set-aside copy is complete, so it still counts as step 5 and is what a resume loads...
    assert assert_complete_and_loadable(tmp_path, parts) == [5]
    # ...and the next save puts it back under its name instead of deleting it.
    save(tmp_path, 6, parts)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000005", "step-00000006"]
    assert assert_complete_and_loadable(tmp_path, parts) == [5, 6]


def test_setting_newer_checkpoints_aside_is_safe_against_a_kill_too(tmp_path, parts, monkeypatch):
    for step in (1, 2, 3):
        save(tmp_path, step, parts, keep=3)
    real_rename = ckpt.Path.rename

    def killed_after_one(self, target):
        real_rename(self, target)
        raise KeyboardInterrupt  # the first checkpoint is moved, the process dies before the next

    monkeypatch.setattr(ckpt.Path, "rename", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        ckpt.set_aside_after(tmp_path, 1)  # resuming from step 1: steps 2 and 3 go aside
    monkeypatch.setattr(ckpt.Path, "rename", real_rename)
    # Newest first, each moved whole in one rename: what is left is whole, and a prefix...
    assert assert_complete_and_loadable(tmp_path, parts) == [1, 2]
    # ...and what was moved is whole too, under a name that says what it is.
    [aside] = (tmp_path / "checkpoints").glob("superseded-*")
    assert sorted(p.name for p in (aside / "step-00000003").iterdir()) == FILES
