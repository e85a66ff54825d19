"""Choosing the next token, and a streaming generator of token ids over a GPT.

Why it is shaped this way:
- `sample_next` is a pure function of a logits row (temperature, then top-k, then top-p), so the
  engine, the chat REPL and the server all share one definition of each knob.
- `generate` sees only token ids and yields them one at a time, so callers can stream text as it
  is produced, and stop early by simply not asking for more. It checks its arguments when called
  and returns the generator, so a bad flag fails at once rather than at the first token.
- With the KV cache each step feeds only the tokens the cache has not seen (the prompt once, then
  one token); `use_cache=False` recomputes the whole window each step. Both follow the same window
  policy, so they produce the same tokens; the tests hold them to that.
- The context window: a prompt longer than block_size is cut from the left (with a warning).
  With learned positions there is no embedding past block_size, so generation stops (with a
  warning) once the sequence fills the context. With RoPE only relative positions matter, so when
  the window is full the oldest half is dropped and the remaining half re-encoded from position 0,
  and generation continues.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from tinyllm.errors import UserError
from tinyllm.model.gpt import GPT
from tinyllm.model.kv_cache import KVCache


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise UserError for values no sampler accepts (shared by every caller that takes flags)."""
    if not temperature >= 0:
        raise UserError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be >= 1 (or unset for no limit), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1] (or unset for no limit), got {top_p}")


# The seeds torch.Generator.manual_seed takes: a 64-bit pattern, read as signed or unsigned.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def check_seed(seed: int | None) -> None:
    """A seed torch cannot hold is a UserError, not torch's "Overflow when unpacking long long"."""
    if seed is not None and not SEED_MIN <= seed <= SEED_MAX:
        raise UserError(f"seed must be an integer from {SEED_MIN} to {SEED_MAX}, got {seed}")


def seeded_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A generator seeded with `seed` (checked), or None (the global stream) without one."""
    check_seed(seed)
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def sample_next(
    logits: Tensor,
    *,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
) -> Tensor:
    """Next token ids [B] from logits [B, V].

    temperature 0 takes the argmax (top_k and top_p are then irrelevant). Otherwise the logits are
    divided by the temperature, restricted to the k most likely tokens (top_k) and to the smallest
    set whose probability reaches top_p (top_p, always at least one token), and sampled.
    `generator` may be one per row (a server's batch of seeded requests): each row then draws
    from its own, the same number as it would alone.
    """
    check_sampling_args(temperature, top_k, top_p)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    # Relative to each row's maximum and in float64: any positive temperature, however small,
    # then gives the most likely token probability 1 instead of inf / inf = NaN (an API client
    # sent 1.6e-74), and a huge one gives the uniform distribution.
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)).double() / temperature  # [B, V], <= 0
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B, V]
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    # One uniform draw per row against the cumulative distribution: torch.multinomial draws an
    # exponential for every vocabulary entry, ~50x the time of this draw over 50k tokens, and was
    # over a quarter of a batch-8 decoding step in the server. A token of probability 0 is never
    # found (its cdf equals the one before it).
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)  # [B, V], float64
    if generator is None or isinstance(generator, torch.Generator):
        u = torch.rand(cdf.shape[0], 1, dtype=cdf.dtype, device=cdf.device, generator=generator)
    else:
        if len(generator) != cdf.shape[0]:
            raise ValueError(f"{len(generator)} generators for {cdf.shape[0]} rows of logits")
        u = torch.cat([torch.rand(1, 1, dtype=cdf.dtype, device=cdf.device, generator=g)
                       for g in generator])
    picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # [B, 1]
    return picked.squeeze(-1).clamp(max=cdf.shape[-1] - 1)


def generate(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_ids: Collection[int] = (),
    use_cache: bool = True,
    logit_bias: Mapping[int, float] | None = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids, one at a time, for batch-1 `prompt_ids`.

    Arguments are checked at the call (UserError), before the first token is asked for. Stops
    before yielding any id in `stop_ids`. The same `seed` gives the same tokens. The model is in
    eval mode while the generator runs and is restored afterwards. See the module docstring for
    what happens at the end of the context. `logit_bias` adds a value to a token's logit before
    each draw (OpenAI's logit_bias: -100 all but bans a token, 100 all but forces it).
    """
    check_sampling_args(temperature, top_k, top_p)
    cfg = model.config
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    ids = checked_prompt(prompt_ids, cfg.vocab_size, cfg.block_size, stacklevel=3)
    device = next(model.parameters()).device
    generator = seeded_generator(seed, device)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    bias = logit_bias_tensor(logit_bias, cfg.vocab_size, device)
    cache = model.make_kv_cache(batch_size=1) if use_cache else None
    return _stream(model, ids, max_new_tokens, cache, frozenset(stop_ids), sampling, bias)


def checked_prompt(prompt_ids: Sequence[int], vocab_size: int, block_size: int, *,
                   stacklevel: int = 2) -> list[int]:
    """The prompt's ids, refused (UserError) when empty or outside the vocabulary; a prompt longer
    than the context keeps its last `block_size` tokens, with a warning (`stacklevel` as in
    `warnings.warn`, from here: 2 names the caller)."""
    if len(prompt_ids) == 0:
        raise UserError("the prompt is empty: give at least one token")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise UserError(
            f"prompt token id {bad[0]} is outside the model's vocabulary [0, {vocab_size})"
        )
    if len(prompt_ids) > block_size:
        warnings.warn(
            f"prompt of {len(prompt_ids)} tokens is longer than the model's context ({block_size}); "
            f"keeping its last {block_size} tokens",
            stacklevel=stacklevel,
        )
    return list(prompt_ids[-block_size:])


def logit_bias_tensor(logit_bias: Mapping[int, float] | None, vocab_size: int,
                      device: torch.device) -> Tensor | None:
    """OpenAI's logit_bias as a [V] tensor added to the logits, or None; ids outside the
    vocabulary are a UserError."""
    if not logit_bias:
        return None
    bad = [t for t in logit_bias if not 0 <= t < vocab_size]
    if bad:
        raise UserError(
            f"logit_bias token id {bad[0]} is outside the model's vocabulary [0, {vocab_size})"
        )
    bias = torch.zeros(vocab_size, device=device)  # [V]
    bias[list(logit_bias)] = torch.tensor([float(v) for v in logit_bias.values()], device=device)
    return bias


@torch.no_grad()
def _stream(
    model: GPT,
    ids: list[int],
    max_new_tokens: int,
    cache: KVCache | None,
    stop_ids: frozenset[int],
    sampling: dict,
    bias: Tensor | None,
) -> Iterator[int]:
    cfg = model.config
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        start = 0  # ids[start:] is the window the model sees
        for _ in range(max_new_tokens):
            if len(ids) - start > cfg.block_size:
                if cfg.pos_emb == "learned":
                    warnings.warn(
                        f"generation stopped at the model's context of {cfg.block_size} tokens "
                        "(learned position embeddings end there)",
                        stacklevel=2,
                    )
                    return
                start = len(ids) - max(1, cfg.block_size // 2)
                if cache is not None:
                    cache.reset()
            # Without a cache the whole window; with one, only what the cache has not seen yet.
            feed = ids[start:] if cache is None else ids[start + cache.length :]
            x = torch.tensor([feed], dtype=torch.long, device=device)
            logits = model(x, kv_cache=cache, last_only=True)[:, -1, :]  # [1, V]
            if bias is not None:
                logits = logits.float() + bias
            token = int(sample_next(logits, **sampling)[0])
            if token in stop_ids:
                return
            yield token
            ids.append(token)
    finally:
        model.train(was_training)
