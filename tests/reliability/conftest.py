"""Shared helpers for the reliability tests: the real CLI in a subprocess, a prepared dataset, a
small trained run to damage, and snapshots that prove a failed command wrote nothing.

Subprocesses run PyTorch on one thread: these tests share two cores with other work, and one
thread keeps each short run fast and its losses independent of what else is running.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tinyllm.config import resolve
from tinyllm.data.dataset import default_builtin_dataset
from tinyllm.train.trainer import Trainer

_PROGRESS_BAR = re.compile(r"^\s*\d+%\|.*\|")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# The tiny preset cut down further: one micro-batch of 2 rows a step, nothing but training.
TINY = ["--preset", "tiny", "--eval-every", "0", "--sample-every", "0",
        "--set", "train.micro_batch=2", "--set", "train.grad_accum=1"]


def cli(*args: str, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """`tinyllm ARGS...` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "tinyllm", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout, **popen)


def assert_user_error(r: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2 and one line on stderr, no traceback, holding every fragment; returns the line.

    A training progress bar may precede it on stderr: its redraws are not counted as lines.
    """
    lines = [line for line in r.stderr.splitlines() if line.strip() and not _PROGRESS_BAR.search(line)]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(*roots: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under `roots` (or the root itself): size, mtime and content hash, by path."""
    out = {}
    for root in map(Path, roots):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            st = p.stat()
            out[str(p)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        if root.is_dir():
            out.update({str(p): (-1, 0, "dir") for p in root.rglob("*") if p.is_dir()})
    return out


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """A small prepared builtin dataset (tests that damage it work on a copy)."""
    return default_builtin_dataset(max_tokens=40_000, cache_dir=tmp_path_factory.mktemp("cache"))


def tiny_config(data: Path, **train):
    overrides = [("data.dir", str(data), "test"), ("train.micro_batch", 2, "test"), ("train.grad_accum", 1, "test"),
                 ("train.eval_every", 0, "test"), ("train.sample_every", 0, "test")]
    return resolve("tiny", overrides=overrides + [(f"train.{k}", v, "test") for k, v in train.items()])


@pytest.fixture(scope="session")
def trained(data, tmp_path_factory) -> Path:
    """A tiny run of 2 steps with a checkpoint after each (tests copy it before damaging it)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    Trainer(tiny_config(data, max_steps=2, checkpoint_every=1), run, echo=False).run()
    return run


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


@pytest.fixture
def data_copy(data, tmp_path) -> Path:
    return Path(shutil.copytree(data, tmp_path / "data"))
