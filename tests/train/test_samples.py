"""Samples during training continue prompts from the run's own data unless the user sets them."""

from __future__ import annotations

import json

import pytest

from tinyllm.config import resolve
from tinyllm.data.prepare import PrepareOptions, prepare
from tinyllm.data.prompts import opening_prompts
from tinyllm.data.source_specs import resolve_sources
from tinyllm.train.trainer import Trainer

LINES = ["Before we proceed any further, hear me speak.", "You are all resolved rather to die than to famish?",
         "We are accounted poor citizens, the patricians good.", "What authority surfeits on would relieve us."]


@pytest.fixture(scope="module")
def play(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("play")
    docs = [{"text": f"CITIZEN {i}:\n{LINES[i % 4]}\n{LINES[(i + 1) % 4]}\n{LINES[(i + 2) % 4]}"} for i in range(40)]
    (root / "play.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    prepare(resolve_sources([str(root / "play.jsonl")]), root / "data", PrepareOptions(progress=False))
    return str(root / "data")


def sampled_prompts(run) -> list[str]:
    """The text of each logged sample (prompt and continuation) at step 0."""
    log = (run / "train_output.txt").read_text()
    return [block.split("\n---")[0] for block in log.split("--- sample at step 0 ---\n")[1:]]


def train(data: str, run, *overrides) -> None:
    cfg = resolve("tiny", overrides=[("data.dir", data, "test"), ("train.max_steps", 1, "test"),
                                     ("train.eval_every", 0, "test"), ("train.sample_every", 5, "test"),
                                     ("train.sample_tokens", 4, "test"), *overrides])
    Trainer(cfg, run, echo=False).run()


def test_default_prompts_are_openings_of_the_runs_val_documents(tmp_path, play):
    train(play, tmp_path)
    prompts = opening_prompts(play)
    assert len(prompts) == 3 and all(p.startswith("CITIZEN ") for p in prompts)
    samples = sampled_prompts(tmp_path)
    assert len(samples) == 3 and all(s.startswith(p) for s, p in zip(samples, prompts, strict=True))
    assert "Once upon a time" not in (tmp_path / "train_output.txt").read_text()


def test_prompts_the_user_sets_win(tmp_path, play):
    train(play, tmp_path, ("train.sample_prompts", ["Thus spoke"], "test"))
    samples = sampled_prompts(tmp_path)
    assert len(samples) == 1 and samples[0].startswith("Thus spoke")
