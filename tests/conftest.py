"""Helpers every test folder may use."""

from __future__ import annotations

import pytest
import torch

from tinyllm.model.gpt import GPT, GPTConfig


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
