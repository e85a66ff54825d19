"""Files a run depends on are replaced whole: a kill in the middle of writing one leaves the old
file as it was (metrics.jsonl cut back on resume, the run's config.toml), never a torn mix."""

import builtins
import io
import json
from pathlib import Path

import pytest

from tinyllm import fsio
from tinyllm.config import read_toml, resolve, save_toml
from tinyllm.train.logs import METRICS, RunLog


class _KilledMidWrite:
    """A file whose first write puts half its text on disk, then the process 'dies'."""

    def __init__(self, real):
        self._real = real

    def write(self, text):
        self._real.write(text[: len(text) // 2])
        self._real.flush()
        raise KeyboardInterrupt

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._real.close()

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.fixture
def kill_writes_to(monkeypatch):
    """kill_writes_to(name): writing a file called `name` (or its temporary) is cut short."""
    real_open = builtins.open

    def arm(name: str) -> None:
        def cut_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            hit = isinstance(file, (str, Path)) and name in Path(file).name and "w" in mode
            return _KilledMidWrite(f) if hit else f

        # Path.write_text opens through io.open, plain code through builtins.open: the same function.
        monkeypatch.setattr(builtins, "open", cut_open)
        monkeypatch.setattr(io, "open", cut_open)

    return arm


def test_atomic_write_killed_midway_keeps_the_old_file_and_no_temporary(tmp_path, kill_writes_to):
    path = tmp_path / "notes.txt"
    fsio.atomic_write_text(path, "old " * 100)
    kill_writes_to("notes.txt")
    with pytest.raises(KeyboardInterrupt):
        fsio.atomic_write_text(path, "new " * 100)
    assert path.read_text() == "old " * 100
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_resume_killed_while_cutting_metrics_back_keeps_the_whole_loss_curve(tmp_path, kill_writes_to):
    records = [{"step": s, "loss": 10.0 - s} for s in range(1, 21)]
    (tmp_path / METRICS).write_text("".join(json.dumps(r) + "\n" for r in records))
    kill_writes_to(METRICS)
    with pytest.raises(KeyboardInterrupt):
        RunLog(tmp_path, resume_step=10, tensorboard=False, echo=False)  # a resume from step 10
    lines = (tmp_path / METRICS).read_text().splitlines()
    assert [json.loads(line) for line in lines] == records


def test_resume_cuts_metrics_back_to_the_checkpoint(tmp_path):
    records = [{"step": s, "loss": 10.0 - s} for s in range(1, 21)]
    (tmp_path / METRICS).write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 21, "lo')
    log = RunLog(tmp_path, resume_step=10, tensorboard=False, echo=False)
    log.close()
    assert [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()] == records[:10]


def test_config_killed_midway_keeps_the_previous_config(tmp_path, kill_writes_to):
    path = tmp_path / "config.toml"
    save_toml(resolve("tiny"), path)
    before = path.read_text()
    kill_writes_to("config.toml")
    with pytest.raises(KeyboardInterrupt):
        save_toml(resolve("cpu"), path)
    assert path.read_text() == before and read_toml(path)["preset"] == "tiny"
