"""Shared fixtures for the evaluation tests: a small builtin dataset and a tiny untrained GPT."""

from __future__ import annotations

import pytest
import torch

from tinyllm.data.prepare import PrepareOptions, prepare
from tinyllm.data.source_specs import resolve_sources
from tinyllm.model.gpt import GPT, GPTConfig


@pytest.fixture(scope="package")
def builtin_data(tmp_path_factory):
    """The builtin corpus, ~6,000 tokens: stories with Q&A, a val split and an entropy floor."""
    out = tmp_path_factory.mktemp("builtin")
    manifest = prepare(resolve_sources([]), out, PrepareOptions(max_tokens=6_000, progress=False))
    return out, manifest


@pytest.fixture
def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64))
