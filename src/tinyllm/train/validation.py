"""The validation loss a run logs as it trains: a fixed set of rows, scored alike by one process or many.

Why it is shaped this way: the curve must compare across evaluations, and with what `tinyllm eval
--max-batches train.eval_batches` reports, so the rows are chosen once (each source's first rows,
sources sharing by size, none twice: `TokenLoader.eval_rows`) and kept on the device. Scoring is
the exact mean over their targets and its bits per byte (`eval.loss`). Under DDP each rank scores
a share of the batches on its own replica and the sums are added; FSDP ranks must run the same
forwards (each holds a shard of every layer), so every rank scores all of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tinyllm.data.loader import TokenLoader
from tinyllm.eval.loss import EvalResult, LossSum, score_batches
from tinyllm.train import distributed
from tinyllm.train.distributed import Dist

Batches = list[tuple[torch.Tensor, torch.Tensor]]  # ([B, T] inputs, [B, T] targets, -1 = no loss)


def fixed_batches(val: TokenLoader, batches: int, device: torch.device) -> Batches:
    """`batches` batches' worth of `val`'s rows, the same every time; a smaller split is taken whole."""
    return [(b.inputs.to(device), b.targets.to(device)) for _, b in val.eval_pass(batches * val.batch_size)]


@torch.no_grad()
def val_loss(forward: Callable, model: nn.Module, batches: Batches, d: Dist, device: torch.device,
             amp: torch.dtype | None) -> EvalResult:
    """The loss over `batches`: through `forward` (compiled, maybe) alone; the bare `model` under torchrun."""
    if not d.active:
        return score_batches(forward, batches, device=device, autocast_dtype=amp).result()
    mine = batches if d.sharded else batches[d.rank :: d.world_size]
    total = score_batches(model, mine, device=device, autocast_dtype=amp)
    if not d.sharded:
        nats, tokens, n_bytes = distributed.sum_across([total.nats, total.tokens, total.bytes], d)
        total = LossSum(nats, int(tokens), int(n_bytes))
    return total.result()
