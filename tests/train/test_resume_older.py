"""Resuming from an older checkpoint deletes nothing the user made: the newer checkpoints are
moved to `checkpoints/superseded-DATE-TIME/`, whole, and rotation deletes only the run's own
checkpoints older than the one just completed. A run written by older code (its config.toml
naming the context length data.context) still samples and continues."""

import hashlib
from pathlib import Path

import pytest
import torch

from tinyllm.cli import main
from tinyllm.config import read_toml, resolve
from tinyllm.data.dataset import default_builtin_dataset
from tinyllm.model.gpt import GPT
from tinyllm.runtime import checkpoint as ckpt
from tinyllm.train.optim import build_optimizer
from tinyllm.train.run_plan import plan_run
from tinyllm.train.trainer import Trainer

QUIET = ["--eval-every", "0", "--sample-every", "0", "--set", "train.micro_batch=2", "--set", "train.grad_accum=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return str(default_builtin_dataset(max_tokens=40_000, cache_dir=tmp_path_factory.mktemp("cache")))


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def names(run: Path) -> list[str]:
    return [p.name for p in ckpt.list_checkpoints(run)]


def test_resume_from_an_older_checkpoint_moves_the_newer_ones_aside_whole(tmp_path, data):
    run = tmp_path / "run"
    base = ["train", "--preset", "tiny", "--data", data, "--out", str(run), *QUIET, "--checkpoint-every", "2"]
    assert main([*base, "--max-steps", "6", "--set", "train.keep_checkpoints=5"]) == 0
    assert names(run) == ["step-00000002", "step-00000004", "step-00000006"]
    before = {n: digests(run / "checkpoints" / n) for n in ("step-00000004", "step-00000006")}

    older = run / "checkpoints" / "step-00000002"
    # keep_checkpoints 1: rotation now deletes step 2 once step 4 is saved, but never the set-aside ones.
    assert main([*base, "--max-steps", "6", "--resume", str(older), "--set", "train.keep_checkpoints=1"]) == 0
    assert names(run) == ["step-00000006"]  # the new timeline's own
    [aside] = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("superseded-")]
    assert {n: digests(aside / n) for n in before} == before  # byte for byte what was there
    assert "came after step 2" in (aside / "README.txt").read_text()
    log = (run / "train_output.txt").read_text()
    assert f"moved the checkpoints after step 2 to {aside} (kept, not deleted)" in log

    # A superseded checkpoint can be continued: its run is still RUN, not RUN/checkpoints.
    plan = plan_run(None, resume=str(aside / "step-00000006"))
    assert plan.run_dir == run and plan.resume_from == aside / "step-00000006"


def test_resuming_the_newest_checkpoint_sets_nothing_aside(tmp_path, data):
    cfg = resolve("tiny", overrides=[("data.dir", data, "test"), ("train.max_steps", 2, "test"),
                                     ("train.eval_every", 0, "test"), ("train.sample_every", 0, "test")])
    Trainer(cfg, tmp_path, echo=False).run()
    plan = plan_run(tmp_path, overrides=[("train.max_steps", 3, "test")])
    Trainer(plan.config, tmp_path, resume_from=plan.resume_from, echo=False).run()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]


def save(run: Path, step: int, keep: int) -> Path:
    cfg = resolve("tiny")
    model = GPT(cfg.model)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    return ckpt.save_checkpoint(run, step, model=model, optimizer=opt, state={}, config=cfg, keep=keep)


def test_rotation_deletes_only_checkpoints_older_than_the_one_just_saved(tmp_path):
    for step in (2, 4, 6):
        save(tmp_path, step, keep=5)
    save(tmp_path, 3, keep=2)  # a step-6 newer than it is not the rotation's to delete, nor is step 3 itself
    assert names(tmp_path) == ["step-00000002", "step-00000003", "step-00000004", "step-00000006"]
    save(tmp_path, 5, keep=2)  # keeps 5 and the one before it (4); the older 2 and 3 go
    assert names(tmp_path) == ["step-00000004", "step-00000005", "step-00000006"]


def test_set_aside_moves_only_newer_checkpoints_into_a_folder_of_their_own(tmp_path):
    for step in (2, 4, 6):
        save(tmp_path, step, keep=5)
    first = ckpt.set_aside_after(tmp_path, 4)
    assert names(tmp_path) == ["step-00000002", "step-00000004"]
    assert sorted(p.name for p in first.iterdir()) == ["README.txt", "step-00000006"]
    second = ckpt.set_aside_after(tmp_path, 2)  # often within the same second: still a folder of its own
    assert second != first and sorted(p.name for p in second.iterdir()) == ["README.txt", "step-00000004"]
    assert ckpt.set_aside_after(tmp_path, 2) is None
    assert ckpt.run_dir_of(second / "step-00000004") == tmp_path


def test_a_run_whose_config_names_data_context_samples_and_continues(tmp_path, data, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", data, "--out", str(run), *QUIET, "--max-steps", "2"]) == 0
    for f in (run / "config.toml", *run.glob("checkpoints/*/config.toml")):  # as runs wrote them before
        f.write_text(f.read_text().replace("[data]\n", "[data]\ncontext = 32\n"))
    assert "context = 32" in (run / "checkpoints" / "step-00000002" / "config.toml").read_text()
    assert main(["sample", "--run", str(run), "--prompt", "Once", "--max-new-tokens", "4", "--seed", "1"]) == 0
    assert main(["train", "--out", str(run), *QUIET, "--max-steps", "3"]) == 0
    assert "resuming at step 2" in capsys.readouterr().out
    assert names(run) == ["step-00000002", "step-00000003"]
    assert "context" not in read_toml(run / "config.toml")["data"]  # written back with the one name
