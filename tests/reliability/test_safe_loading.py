"""A crafted checkpoint cannot run code: weights load from safetensors, other state through
torch's weights-only unpickler or JSON, and a pickle payload is refused unopened with a clear error.

The payload is real: its `__reduce__` makes the unpickler call `open(MARKER, "w")`, which creates
a file. `test_the_payload_is_live` shows that a plain `pickle.load` does create it; every other
test shows that tinyllm, handed the same bytes, does not.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from tinyllm.errors import UserError
from tinyllm.model.gpt import GPT
from tinyllm.runtime.checkpoint import (
    latest_checkpoint,
    load_model,
    load_training_state,
    read_config,
)
from tinyllm.train.optim import build_optimizer

from .conftest import assert_user_error, cli, snapshot


class Payload:
    """Unpickling this calls open(path, "w"): the file appearing means code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant(ckpt: Path, name: str, marker: Path, form: str) -> None:
    """Replace checkpoint file `name` by the payload, as torch.save writes it or as a bare pickle."""
    path = ckpt / name
    if form == "torch.save":
        torch.save({"state": {0: Payload(marker)}, "param_groups": []}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker), protocol=2))


def test_the_payload_is_live(tmp_path):
    marker = tmp_path / "pwned"
    plant(tmp_path, "evil.pkl", marker, "pickle")
    with open(tmp_path / "evil.pkl", "rb") as f:
        pickle.load(f).close()  # the unsafe way: the file appears
    assert marker.exists()


@pytest.mark.parametrize("name", ["optimizer.pt", "rng.pt"])
@pytest.mark.parametrize("form", ["torch.save", "pickle"])
def test_resuming_refuses_a_pickle_payload_without_running_it(run_copy, tmp_path, name, form):
    ckpt = latest_checkpoint(run_copy)
    marker = tmp_path / "pwned"
    plant(ckpt, name, marker, form)
    cfg = read_config(ckpt)
    model = GPT(cfg.model)
    with pytest.raises(UserError, match=rf"{name} cannot be loaded \(.*(refused unopened|not a torch file)"):
        load_training_state(ckpt, model, build_optimizer(model, cfg.optim, "cpu"))
    assert not marker.exists()


def test_resume_from_the_cli_refuses_it_and_changes_nothing(run_copy, tmp_path):
    ckpt = latest_checkpoint(run_copy)
    marker = tmp_path / "pwned"
    plant(ckpt, "optimizer.pt", marker, "torch.save")
    before = snapshot(run_copy)
    r = cli("train", "--out", str(run_copy), "--resume", "--max-steps", "4")
    assert_user_error(r, f"{ckpt}/optimizer.pt cannot be loaded", "refused unopened")
    assert not marker.exists()
    assert snapshot(run_copy) == before


def test_a_payload_instead_of_the_weights_is_refused_by_sample(run_copy, tmp_path):
    ckpt = latest_checkpoint(run_copy)
    marker = tmp_path / "pwned"
    plant(ckpt, "model.safetensors", marker, "torch.save")
    with pytest.raises(UserError, match="model.safetensors cannot be loaded .not a complete safetensors file"):
        load_model(run_copy)
    r = cli("sample", "--run", str(run_copy), "--max-new-tokens", "2")
    assert_user_error(r, "model.safetensors cannot be loaded")
    assert not marker.exists()


def test_sample_never_reads_the_training_state(run_copy, tmp_path):
    """Inference needs only the weights and the config: payloads elsewhere are never opened."""
    ckpt = latest_checkpoint(run_copy)
    marker = tmp_path / "pwned"
    for name in ("optimizer.pt", "rng.pt"):
        plant(ckpt, name, marker, "pickle")
    r = cli("sample", "--run", str(run_copy), "--max-new-tokens", "3", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert not marker.exists()


def test_state_json_that_is_not_json_is_refused(run_copy, tmp_path):
    ckpt = latest_checkpoint(run_copy)
    (ckpt / "state.json").write_bytes(pickle.dumps(Payload(tmp_path / "pwned")))
    cfg = read_config(ckpt)
    model = GPT(cfg.model)
    with pytest.raises(UserError, match=r"state.json cannot be loaded \(not JSON"):
        load_training_state(ckpt, model, build_optimizer(model, cfg.optim, "cpu"))
    (ckpt / "state.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=r"state.json cannot be loaded \(not the state.json tinyllm writes"):
        load_training_state(ckpt, model, build_optimizer(model, cfg.optim, "cpu"))
    assert not (tmp_path / "pwned").exists()


def test_checkpoints_tinyllm_writes_hold_only_safe_formats(trained):
    """What the refusals above rely on: no file of a real checkpoint needs the full unpickler."""
    ckpt = latest_checkpoint(trained)
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.toml", "model.safetensors", "optimizer.pt", "rng.pt",
                                                       "state.json"]
    for name in ("optimizer.pt", "rng.pt"):
        torch.load(ckpt / name, weights_only=True)  # raises if anything but tensors and containers were saved
