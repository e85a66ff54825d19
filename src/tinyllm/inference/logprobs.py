"""The log-probability the model gives each token of a sequence, with its top alternatives.

Why it is shaped this way: one definition of "the score of a token" serves the server's
`logprobs` / `echo` options and the in-process multiple-choice tasks (`tinyllm.eval.tasks`), so
the harness scoring through `tinyllm serve` and `tinyllm eval --task` add up the very same
floats. It sees token ids only, runs one full forward (no KV cache, the same shape every time)
and never cuts the sequence: whoever calls it has already made it fit the context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from tinyllm.model.gpt import GPT


@dataclass(frozen=True)
class TokenScores:
    """Per position t of the scored ids: log p(ids[t] | ids[:t]) and the `top` best alternatives.

    Position 0 has no context, so its logprob is None and its alternatives are empty.
    """

    ids: tuple[int, ...]
    logprobs: tuple[float | None, ...]
    top: tuple[tuple[tuple[int, float], ...], ...]  # per position: (id, logprob), best first


@torch.no_grad()
def token_logprobs(model: GPT, ids: list[int], top: int = 0) -> TokenScores:
    """Score every token of `ids` (1 <= len <= block_size) given the tokens before it."""
    if not 1 <= len(ids) <= model.config.block_size:
        raise ValueError(f"need 1..{model.config.block_size} ids to score, got {len(ids)}")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        x = torch.tensor([ids], dtype=torch.long, device=device)
        logp = F.log_softmax(model(x)[0, :-1].float(), dim=-1)  # [T-1, V]: row t predicts ids[t+1]
    finally:
        model.train(was_training)
    target = torch.tensor(ids[1:], dtype=torch.long, device=device)
    chosen = logp.gather(1, target[:, None])[:, 0].tolist()  # [T-1]
    alternatives: list[tuple[tuple[int, float], ...]] = [()]
    if top > 0 and len(ids) > 1:
        values, indices = logp.topk(min(top, logp.shape[-1]), dim=-1)  # [T-1, top]
        alternatives += [
            tuple(zip(row_i, row_v, strict=True))
            for row_i, row_v in zip(indices.tolist(), values.tolist(), strict=True)
        ]
    else:
        alternatives += [()] * (len(ids) - 1)
    return TokenScores(tuple(ids), (None, *chosen), tuple(alternatives))
