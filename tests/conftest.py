"""Helpers every test folder may use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tensorboard.summary.writer.record_writer import RecordWriter

from tinyllm.model.gpt import GPT, GPTConfig
from tinyllm.runtime.run_dir import METRICS, PLOT, TEXT_LOG


def model_preferring(token_id: int) -> GPT:
    """A tiny GPT (the real vocabulary) whose next token is `token_id` with probability ~0.3 at
    temperature 1 and ordinary tokens otherwise, whatever the input; greedy always picks it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, n_layer=1, n_head=2, n_embd=32, tie_embeddings=False))
    with torch.no_grad():
        # A constant final hidden state b makes the logits head @ b; give token_id logit ~10.
        b = torch.ones(model.config.n_embd) / model.config.n_embd**0.5
        model.ln_f.weight.zero_()
        model.ln_f.bias.copy_(b)
        model.head_weight.mul_(0.05)
        model.head_weight[token_id] = 10 * b
    return model.eval()


@pytest.fixture(scope="session")
def preferring():
    """`preferring(token_id)`: see `model_preferring`; forces a token (a special one) into output."""
    return model_preferring


def stop_after(trainer, step: int) -> None:
    """Make `trainer` stop as Ctrl-C would when asked after `step`: it saves and ends once the step
    under way (the next) is done."""
    original = trainer._after_step

    def after(*args):
        original(*args)
        if trainer.step == step:
            trainer.stop()

    trainer._after_step = after


@pytest.fixture(scope="session")
def stopping():
    """`stopping(trainer, step)`: see `stop_after`; a stopped-then-resumed run for exact-resume tests."""
    return stop_after


def fill_disk_under(log, which: str) -> Path:
    """From now on, writes to the run log's `which` file fail as on a full disk (ENOSPC from the
    kernel: /dev/full); returns the path the error should name."""
    if which == "text":
        log._text = open("/dev/full", "w", encoding="utf-8")  # the run log closes it
        return log.run_dir / TEXT_LOG
    if which == "metrics":
        log._metrics = open("/dev/full", "a", encoding="utf-8")
        return log.run_dir / METRICS
    if which == "tensorboard":
        log._tb._records = RecordWriter(open("/dev/full", "ab"))
        return log._tb.path
    (log.run_dir / f".{PLOT}.tmp").symlink_to("/dev/full")  # the plot's temporary name, before its rename
    return log.run_dir / PLOT


@pytest.fixture
def disk_full():
    """`disk_full(log, which)`: see `fill_disk_under`; skips where there is no /dev/full (not Linux)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux)")
    return fill_disk_under
