"""Tiny random-weight GPTs with the real tokenizer, and real uvicorn servers around them.

The vocabulary must be the tokenizer's 50,260 ids; everything else is as small as it gets. A
`SlowGPT` sleeps in each forward so that tests can watch requests overlap and disconnect while a
generation is still running, without burning the shared CPU cores.
"""

from __future__ import annotations

import time

import pytest
import torch

from tinyllm.model.gpt import GPT, GPTConfig
from tinyllm.serve import BackgroundServer
from tinyllm.tokenizer import get_tokenizer

# An untied head, so sharpening it (below) leaves the input embeddings alone.
TINY = dict(block_size=256, n_layer=2, n_head=2, n_embd=32, tie_embeddings=False)
MODEL_NAME = "tiny-test"


class SlowGPT(GPT):
    """A GPT whose every forward takes at least `delay` seconds longer."""

    delay = 0.02

    def forward(self, *args, **kwargs):
        time.sleep(self.delay)
        return super().forward(*args, **kwargs)


def tiny_model(cls: type[GPT] = GPT, **overrides) -> GPT:
    torch.manual_seed(0)
    model = cls(GPTConfig(**{**TINY, **overrides}))
    # Sharpen the random model so greedy decoding is not decided by float noise.
    with torch.no_grad():
        model.head_weight.mul_(20)
    return model


@pytest.fixture(scope="session")
def model_name() -> str:
    return MODEL_NAME


@pytest.fixture(scope="session")
def make_model():
    """`make_model(cls=GPT, **config_overrides)`: a seeded, sharpened tiny model."""
    return tiny_model


@pytest.fixture(scope="session")
def slow_gpt():
    return SlowGPT


@pytest.fixture(scope="session")
def tokenizer():
    return get_tokenizer()


@pytest.fixture(scope="session")
def server(tokenizer):
    """A fast tiny model behind a real server."""
    with BackgroundServer(tiny_model(), tokenizer, model_name=MODEL_NAME) as srv:
        yield srv


@pytest.fixture(scope="session")
def slow_server(tokenizer):
    """A tiny model taking >= 20 ms a token, with 8 slots."""
    with BackgroundServer(
        tiny_model(SlowGPT), tokenizer, model_name=MODEL_NAME, max_active=8
    ) as srv:
        yield srv


def _wait_for(predicate, timeout: float = 5.0, interval: float = 0.02):
    """Poll `predicate` until it returns a truthy value (returned) or `timeout` passes (None)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


@pytest.fixture(scope="session")
def wait_for():
    """`wait_for(predicate, timeout=5.0)`: poll until truthy; returns the value, or None on timeout."""
    return _wait_for
