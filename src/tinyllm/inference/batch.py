"""Decoding many independent requests with one forward per token: the server's batched engine.

Why it is shaped this way:
- Decoding one token reads every weight once (memory bandwidth bounds it), so feeding one token
  for each of B requests in the same forward costs little more than feeding one: the batch-8
  decode bench ran ~3x the tokens/s of batch 1.
- A request joins (`add`) with a prefill of its own prompt in a batch-1 `KVCache`, draws its
  first token from it, and its keys and values become one row of a `BatchKVCache`. Prompts are
  not padded into one prefill: a request arriving mid-way must not wait for others, and padding
  would spend compute on pads. From then on `step` feeds every row's last token in one forward;
  each row keeps its own positions and attends to its own keys only, and a row leaves (`remove`)
  between steps without moving the others. So a row's tokens are those `generate` gives the
  request alone (the tests hold greedy runs to exact equality, learned positions and RoPE).
- Sampling stays per row, through the same `sample_next` with the row's own temperature, top-k,
  top-p, seeded generator, logit bias and stop ids: a seed draws the same tokens alone or batched.
  Rows that sample alike are drawn in one call, each from its own generator.
- The context window follows `generate`: with learned positions a row that fills the context
  ends; with RoPE its oldest half is dropped and the rest prefilled again, alone, before the step
  feeds its last token.
- Requests are checked as `generate` checks them (UserError at `add`, before any forward), so the
  server refuses the same prompts and flags either way.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from tinyllm.inference.sampling import (
    check_sampling_args,
    checked_prompt,
    logit_bias_tensor,
    sample_next,
    seeded_generator,
)
from tinyllm.model.gpt import GPT
from tinyllm.model.kv_cache import BatchKVCache, KVCache


@dataclass
class _Row:
    ids: list[int]  # the window the model sees, its last token not yet in the cache
    stop_ids: frozenset[int]
    sampling: dict  # sample_next's keyword arguments, the generator included
    bias: Tensor | None  # [V], added to the logits before each draw


class BatchDecoder:
    """Rows of independent requests over one model; `step` advances all of them in one forward.

    The model must be in eval mode (the server's worker puts it there once).
    """

    def __init__(self, model: GPT) -> None:
        self.model = model
        self._keys: list[Hashable] = []  # request key of each cache row, in row order
        self._rows: dict[Hashable, _Row] = {}
        self._cache: BatchKVCache | None = None

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._rows

    @torch.no_grad()
    def add(
        self,
        key: Hashable,
        prompt_ids: list[int],
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_ids: Collection[int] = (),
        logit_bias: Mapping[int, float] | None = None,
    ) -> int | None:
        """Prefill `prompt_ids` as a new row and return its first token.

        None when that token is a stop id (the row is then gone). Raises UserError for what
        `generate` refuses, before any forward.
        """
        if key in self._rows:
            raise ValueError(f"request {key!r} is already decoding")
        device = self.model.wte.weight.device
        cfg = self.model.config
        ids = checked_prompt(prompt_ids, cfg.vocab_size, cfg.block_size, stacklevel=3)
        check_sampling_args(temperature, top_k, top_p)
        generator = seeded_generator(seed, device)
        row = _Row(
            ids,
            frozenset(stop_ids),
            dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator),
            logit_bias_tensor(logit_bias, cfg.vocab_size, device),
        )
        cache, logits = self._prefill(ids)
        token = self._draw([row], logits)[0]
        if token is None:
            return None
        row.ids.append(token)  # not in the cache yet: the next step feeds it
        if self._cache is None:
            self._cache = BatchKVCache(like=cache)
        self._cache.put(self._cache.batch, cache)
        self._rows[key] = row
        self._keys.append(key)
        return token

    def remove(self, key: Hashable) -> None:
        """Drop a request's row (finished, cancelled, its client gone); unknown keys are ignored."""
        if self._rows.pop(key, None) is None:
            return
        row = self._keys.index(key)
        assert self._cache is not None
        self._cache.remove(row)
        self._keys[row] = self._keys[-1]  # the cache moved its last row into the gap
        self._keys.pop()

    @torch.no_grad()
    def step(self) -> dict[Hashable, int | None]:
        """One new token for every row, in one forward: {key: token, or None once it ended}.

        A row ends (and is removed) on a stop id, or when it fills the context with learned
        positions.
        """
        cfg = self.model.config
        out: dict[Hashable, int | None] = {}
        for key in list(self._keys):
            row = self._rows[key]
            if len(row.ids) > cfg.block_size:  # this token would not fit the context
                if cfg.pos_emb == "learned":
                    out[key] = None
                    self.remove(key)
                    continue
                del row.ids[: len(row.ids) - max(1, cfg.block_size // 2)]
                cache, _ = self._prefill(row.ids[:-1])  # the step feeds the last one
                assert self._cache is not None
                self._cache.put(self._keys.index(key), cache)
        if not self._keys:
            return out
        assert self._cache is not None
        if self.model.training:  # dropout would make every row differ from its request alone
            raise RuntimeError("BatchDecoder needs the model in eval mode")
        device = self.model.wte.weight.device
        last = torch.tensor([[self._rows[k].ids[-1]] for k in self._keys], device=device)  # [B, 1]
        # Ids were checked at add or drawn from the vocabulary: no need to read them back.
        logits = self.model(last, kv_cache=self._cache, last_only=True, known_valid=True)
        keys = list(self._keys)
        tokens = self._draw([self._rows[key] for key in keys], logits[:, -1, :])
        for key, token in zip(keys, tokens, strict=True):
            out[key] = token
            if token is not None:
                self._rows[key].ids.append(token)
        for key, token in out.items():
            if token is None:
                self.remove(key)
        return out

    def _prefill(self, ids: list[int]) -> tuple[KVCache, Tensor | None]:
        """A batch-1 cache holding `ids`, and the logits [1, V] after them (None for no ids)."""
        if self.model.training:
            raise RuntimeError("BatchDecoder needs the model in eval mode")
        cache = self.model.make_kv_cache(batch_size=1)  # block_size long, as the batch's rows
        if not ids:
            return cache, None
        x = torch.tensor([ids], dtype=torch.long, device=cache.k.device)
        return cache, self.model(x, kv_cache=cache, last_only=True)[:, -1, :]

    def _draw(self, rows: list[_Row], logits: Tensor) -> list[int | None]:
        """A token for each row from logits [len(rows), V] (None: a stop id), drawn together where
        rows sample alike: one draw per row over the vocabulary was a fifth of a batch-8 step.
        Each row still draws its own number from its own generator, as it would alone."""
        if any(row.bias is not None for row in rows):
            logits = logits.float().clone()
            for i, row in enumerate(rows):
                if row.bias is not None:
                    logits[i] += row.bias
        alike: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            s = row.sampling
            alike.setdefault((s["temperature"], s["top_k"], s["top_p"]), []).append(i)
        tokens = [0] * len(rows)
        for (temperature, top_k, top_p), idx in alike.items():
            part = logits if len(idx) == len(rows) else logits[idx]
            generators = [rows[i].sampling["generator"] for i in idx]
            picked = sample_next(part, temperature=temperature, top_k=top_k, top_p=top_p,
                                 generator=generators)
            for i, token in zip(idx, picked.tolist(), strict=True):
                tokens[i] = token
        return [None if t in row.stop_ids else t for t, row in zip(tokens, rows, strict=True)]

