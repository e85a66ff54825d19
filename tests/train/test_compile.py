"""`train.compile`: the compiled model trains like the eager one, and a machine that cannot
compile trains eagerly and says why."""

from __future__ import annotations

import json
import stat

import pytest
import torch

from tinyllm.config import resolve
from tinyllm.data.dataset import default_builtin_dataset
from tinyllm.runtime.device import compile_blocker
from tinyllm.train.trainer import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return str(default_builtin_dataset(max_tokens=60_000, cache_dir=tmp_path_factory.mktemp("cache")))


def run(data: str, out, compile: bool):
    values = {"data.dir": data, "train.max_steps": 4, "train.eval_every": 0, "train.sample_every": 0,
              "train.compile": compile, "model.n_layer": 1}
    cfg = resolve("tiny", overrides=[(k, v, "test") for k, v in values.items()])
    trainer = Trainer(cfg, out, echo=False)
    trainer.run()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return trainer, [r["loss"] for r in records if "loss" in r]


def only_on_path(monkeypatch, tmp_path, *programs: str) -> None:
    """PATH holds just these (empty executables), and CXX is unset."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    for name in programs:
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("CXX", raising=False)


def test_a_cpu_without_a_cxx_compiler_cannot_compile(monkeypatch, tmp_path):
    only_on_path(monkeypatch, tmp_path)
    assert "C++ compiler" in compile_blocker(torch.device("cpu"))
    only_on_path(monkeypatch, tmp_path / "with", "clang++")
    assert compile_blocker(torch.device("cpu")) is None


def test_without_a_compiler_the_run_trains_eagerly_and_says_so(monkeypatch, tmp_path, data):
    only_on_path(monkeypatch, tmp_path)
    trainer, losses = run(data, tmp_path / "run", compile=True)
    assert not trainer.compiled and len(losses) == 4
    log = (tmp_path / "run" / "train_output.txt").read_text()
    assert "train.compile is on, but it needs a C++ compiler" in log


@pytest.mark.skipif(compile_blocker(torch.device("cpu")) is not None, reason="no C++ compiler for torch.compile")
def test_compiled_training_follows_eager_training(tmp_path, data):
    trainer, compiled = run(data, tmp_path / "compiled", compile=True)
    assert trainer.compiled
    _, eager = run(data, tmp_path / "eager", compile=False)
    # Fused kernels round differently; the curve is the same to float32 noise.
    assert compiled == pytest.approx(eager, abs=2e-3)
