"""Checkpoints: a full round trip, atomic replacement, pruning, and what a crash leaves behind."""

import os
import random

import numpy as np
import pytest
import torch

import tinyllm.runtime.checkpoint as ckpt
from tinyllm.config import resolve
from tinyllm.errors import UserError
from tinyllm.model.gpt import GPT
from tinyllm.train.optim import build_optimizer


def setup(seed: int = 0):
    cfg = resolve("tiny")
    torch.manual_seed(seed)
    model = GPT(cfg.model)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    x = torch.randint(0, 50000, (2, 8))
    model(x, x).backward()
    opt.step()
    return cfg, model, opt


def save(run, step, model, opt, cfg, keep=3, **state):
    return ckpt.save_checkpoint(run, step, model=model, optimizer=opt, state={"tokens": step, **state},
                                config=cfg, keep=keep)


def test_round_trip_restores_weights_optimizer_rng_and_state(tmp_path):
    cfg, model, opt = setup()
    torch.manual_seed(5)
    random.seed(6)
    np.random.seed(7)
    path = save(tmp_path, 10, model, opt, cfg, loader={"pos": 3})
    expected = (torch.rand(3), random.random(), np.random.rand())
    _, model2, opt2 = setup(seed=1)
    state = ckpt.load_training_state(path, model2, opt2)
    assert state["step"] == 10 and state["loader"] == {"pos": 3}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True))
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(3), expected[0])
    assert (random.random(), np.random.rand()) == expected[1:]
    model2.wte.weight.data.zero_()  # the tie survives loading: the head is still the embedding
    assert model2.head_weight.abs().sum() == 0


def test_every_file_of_a_checkpoint_is_as_readable_as_the_others(tmp_path):
    cfg, model, opt = setup()
    old = os.umask(0o022)
    try:
        path = save(tmp_path, 1, model, opt, cfg)
    finally:
        os.umask(old)
    # A server or a colleague running as another user reads the run: the weights too (safetensors wrote 0600).
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in path.iterdir()} == {
        f.name: "0o644" for f in path.iterdir()}


def test_inference_loading_needs_only_the_checkpoint(tmp_path):
    cfg, model, opt = setup()
    save(tmp_path, 4, model, opt, cfg)
    loaded, cfg2, path = ckpt.load_model(tmp_path)
    assert cfg2 == cfg and path.name == "step-00000004" and not loaded.training
    x = torch.randint(0, 50000, (1, 8))
    assert torch.equal(loaded(x), model.eval()(x))


def test_only_the_newest_k_are_kept(tmp_path):
    cfg, model, opt = setup()
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, opt, cfg, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000004"


def test_saving_the_same_step_twice_replaces_it(tmp_path):
    cfg, model, opt = setup()
    save(tmp_path, 5, model, opt, cfg, note="first")
    path = save(tmp_path, 5, model, opt, cfg, note="second")
    _, m2, o2 = setup()
    assert ckpt.load_training_state(path, m2, o2)["note"] == "second"
    assert len(list((tmp_path / "checkpoints").iterdir())) == 1


def test_a_crash_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    cfg, model, opt = setup()
    good = save(tmp_path, 1, model, opt, cfg, keep=1)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "write_synced", disk_full)  # dies after the weights are written
    with pytest.raises(UserError, match="No space left on device.*step-00000001 is intact"):
        save(tmp_path, 2, model, opt, cfg, keep=1)
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [good.name]
    _, m2, o2 = setup()
    assert ckpt.load_training_state(good, m2, o2)["step"] == 1


def test_a_killed_writer_leaves_a_temporary_that_is_ignored_and_cleaned(tmp_path):
    cfg, model, opt = setup()
    good = save(tmp_path, 1, model, opt, cfg)
    half = tmp_path / "checkpoints" / ".tmp-step-00000002-999"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(tmp_path) == good
    save(tmp_path, 3, model, opt, cfg)
    assert not half.exists()


def test_run_without_checkpoints_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="has no checkpoint yet"):
        ckpt.find_checkpoint(tmp_path)
    with pytest.raises(UserError, match="no such run or checkpoint"):
        ckpt.find_checkpoint(tmp_path / "nope")


def test_a_file_or_the_checkpoints_folder_given_as_the_run(tmp_path):
    cfg, model, opt = setup()
    newest = save(tmp_path / "run", 2, model, opt, cfg)
    # RUN/checkpoints (a tab completion away from RUN) said "has no checkpoint yet".
    assert ckpt.find_checkpoint(tmp_path / "run" / "checkpoints") == newest
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt is a file: give a run directory"):
        ckpt.find_checkpoint(tmp_path / "notes.txt")


def test_incomplete_checkpoint_is_a_clear_error(tmp_path):
    cfg, model, opt = setup()
    path = save(tmp_path, 1, model, opt, cfg)
    (path / "optimizer.pt").unlink()
    with pytest.raises(UserError, match="incomplete .missing optimizer.pt"):
        ckpt.load_training_state(path, model, opt)
