"""Held-out loss, perplexity and bits per byte of a model on a prepared split.

Why it is shaped this way:
- The result is an exact token mean: each batch's mean loss is weighted by its number of
  targets (targets of -1 carry no loss), so padded rows, masked chat tokens and a short last
  batch do not bias it. `score_batches` does that over any batches, so the trainer's periodic
  validation over its fixed batches and `evaluate_loss` over a whole split are one computation.
- The split is read by `TokenLoader.eval_pass`: each source's rows in order, each exactly once,
  the same every time, in batches that never mix sources, so every source gets its own loss.
  The total adds the sources' summed nats and tokens: it is the loss of the split read as one
  text, as perplexity and bits per byte mean elsewhere. Weighting sources by their training
  weights instead would make the figure move whenever the mix is re-weighted, with the model
  unchanged; the per-source losses are there for anyone who wants another mix of them.
- `max_batches` N scores N x batch_size rows shared among sources in proportion to their size
  (`TokenLoader.eval_rows`): the trainer's periodic val loss is exactly this with N =
  `train.eval_batches`, and an estimate of the whole pass's total.
- Bits per byte counts the bytes of the very targets that were scored: each target token's UTF-8
  bytes as `Document.rendered()` writes them (chat markup as its text, the <|endoftext|> that
  closes a document as 0 bytes). Summed over every token of a split that is the manifest's
  "bytes"; over the targets it is that less the tokens never scored (each padded row's first
  token; in packed mode the stream's first token and the tail no window reaches). Unlike a
  split-wide bytes/token ratio it stays exact under `max_batches`, padded rows and
  assistant-only targets. bpb = nats / (ln 2 * bytes).
- The entropy floor (builtin corpus) is a per-token figure over every val token, so it and the
  gap are given only for `loss_on="all"` on the val split.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from itertools import groupby
from pathlib import Path

import torch
from torch import nn

from tinyllm.data.loader import Batch, TokenLoader
from tinyllm.errors import UserError
from tinyllm.tokenizer import EOT, PAD, VOCAB_SIZE, get_tokenizer


@dataclass(frozen=True)
class EvalResult:
    loss: float  # nats per target token
    perplexity: float  # exp(loss)
    bits_per_byte: float | None  # None when the targets hold no bytes
    tokens: int  # targets scored
    bytes: int  # UTF-8 bytes those targets stand for
    floor: float | None  # the corpus's entropy floor in nats/token, when the manifest has one
    gap: float | None  # loss - floor
    # evaluate_loss: each source's own figures (its own floor), by name, in the manifest's order
    sources: dict[str, EvalResult] = field(default_factory=dict)


@dataclass(frozen=True)
class LossSum:
    """Summed loss over scored targets: what batches add up to before dividing."""

    nats: float = 0.0
    tokens: int = 0
    bytes: int = 0

    def __add__(self, other: LossSum) -> LossSum:
        return LossSum(self.nats + other.nats, self.tokens + other.tokens, self.bytes + other.bytes)

    @property
    def mean(self) -> float:
        if self.tokens == 0:
            raise UserError("no targets to evaluate on: the split has no tokens with a loss")
        return self.nats / self.tokens

    def result(self, floor: float | None = None) -> EvalResult:
        loss = self.mean
        bpb = self.nats / (math.log(2) * self.bytes) if self.bytes else None
        ppl = math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709
        return EvalResult(loss, ppl, bpb, self.tokens, self.bytes, floor, None if floor is None else loss - floor)


@functools.lru_cache(maxsize=1)
def token_bytes() -> torch.Tensor:
    """int64 [VOCAB_SIZE]: the UTF-8 bytes each id stands for in `Document.rendered()` text.

    <|endoftext|> is 0 (a document's text ends before it) and so is <|pad|> (never a target);
    <|im_start|> and <|im_end|> are their written form, as `rendered()` writes them.
    """
    tok = get_tokenizer()
    lengths = [len(tok.decode_bytes([i])) for i in range(VOCAB_SIZE)]
    lengths[EOT] = lengths[PAD] = 0
    return torch.tensor(lengths, dtype=torch.int64)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def score_batches(model: nn.Module, batches: Iterable[Batch | tuple[torch.Tensor, torch.Tensor]], *,
                  device: torch.device | str | None = None, autocast_dtype: torch.dtype | None = None) -> LossSum:
    """Summed loss over `batches` ((inputs, targets) pairs or Batch), the model in eval mode.

    `model(inputs, targets)` must return the mean loss over targets != -1 (0 when there are none).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    table = token_bytes()
    was_training = model.training
    model.eval()
    total = LossSum()
    try:
        for batch in batches:
            inputs, targets = (batch.inputs, batch.targets) if isinstance(batch, Batch) else batch
            valid = targets != -1  # [B, T]
            n = int(valid.sum())
            if n == 0:  # its mean is 0/0; it adds nothing to a token mean
                continue
            with _autocast(device, autocast_dtype):
                loss = model(inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True))
            scored = targets.cpu()[valid.cpu()]
            total = total + LossSum(float(loss.float()) * n, n, int(table[scored].sum()))
    finally:
        model.train(was_training)
    return total


def evaluate_loss(model: nn.Module, data_dir: str | Path, *, split: str = "val", batch_size: int, context: int,
                  max_batches: int | None = None, device: torch.device | str | None = None,
                  autocast_dtype: torch.dtype | None = None, mode: str = "packed", loss_on: str = "all") -> EvalResult:
    """The model's loss over every row of `split`, each once (or a `max_batches` budget of them).

    The total is the token mean over all sources; `.sources` has each source's own (module
    docstring). `mode` and `loss_on` are the loader's (packed/padded; all/assistant). `device`
    defaults to the model's.
    """
    if max_batches is not None and max_batches < 1:
        raise UserError(f"max_batches must be at least 1 (or None for the whole split), got {max_batches}")
    loader = TokenLoader(data_dir, split, batch_size, context, mode=mode, loss_on=loss_on)
    max_rows = None if max_batches is None else max_batches * batch_size
    sums = {name: score_batches(model, (batch for _, batch in group), device=device, autocast_dtype=autocast_dtype)
            for name, group in groupby(loader.eval_pass(max_rows), key=lambda item: item[0])}
    # Floors are per token over every token of the val split: no bound for another split or loss.
    has_floor = split == "val" and loss_on == "all"
    total = sum(sums.values(), LossSum()).result(loader.manifest.get("floor") if has_floor else None)
    return replace(total, sources={name: s.result(loader.manifest["sources"][name].get("floor") if has_floor else None)
                                   for name, s in sums.items() if s.tokens})
