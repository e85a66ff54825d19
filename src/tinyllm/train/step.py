"""What an optimizer step keeps on the device until the loop next reads it back.

Why this module exists: on a GPU every `.item()`, `float(tensor)` or `if tensor:` makes the host
wait for all queued work, so the next step cannot be queued while this one runs. The step's loss,
gradient norm and "was it finite" are therefore left on the device, and the loop reads them in one
transfer at the steps that read anyway (log, eval, checkpoint, the last one). The checks those
reads served before are kept:
- Token ids are checked on the host, in the CPU batch before its copy to the device (one numpy
  pass over B x T ids, far cheaper than reading them back), so the model and the fused loss are
  told not to check again (`known_valid`).
- A step whose loss or gradient norm is NaN/Inf is skipped on the device: the fused AdamW kernel
  takes a `found_inf` flag (as GradScaler uses it) and leaves weights, moments and its step count
  untouched. Optimizers without such a flag (Muon, non-fused AdamW) read the flag once per
  optimizer step, never per micro-batch.
- The skip is logged and counted (and `train.max_bad_steps` in a row stops the run) when the
  records are read, replayed step by step, so the lines are the same as when each step was read;
  with `train.log_every = 1` they come at the same time too.
Chat fine-tuning and padded pretraining (targets of -1) still read per micro-batch: the loss keeps
the scored rows only, which needs their count on the host, and that saves ~95% of the head's work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tinyllm.config import Config, TrainConfig
from tinyllm.data.loader import Batch, TokenLoader
from tinyllm.errors import EveryRankError, UserError


def check_ids(batch: Batch, vocab_size: int) -> Batch:
    """The CPU batch, once every input id and target is found in [0, vocab_size) (targets may be -1)."""
    for name, ids, low in (("input", batch.inputs, 0), ("target", batch.targets, -1)):
        values = ids.numpy()  # shares the CPU tensor's memory: no copy, no device read
        lo, hi = int(values.min()), int(values.max())
        if lo < low or hi >= vocab_size:
            raise UserError(f"the training data has {name} token ids {lo}..{hi}, outside the model's vocabulary "
                            f"[0, {vocab_size}): prepare the data again with `tinyllm prepare`, or set "
                            f"model.vocab_size to the tokenizer's")
    return batch


def keep_scored(batch: Batch, fraction: float, generator: torch.Generator) -> Batch:
    """`batch` with each target kept with probability `fraction` and the others -1 (`train.loss_fraction`):
    the fused loss then projects only the kept rows onto the vocabulary."""
    if fraction >= 1:
        return batch
    drop = torch.rand(batch.targets.shape, generator=generator) >= fraction  # [B, T]
    return Batch(inputs=batch.inputs, targets=batch.targets.masked_fill(drop, -1))


def next_batches(loader: TokenLoader, count: int, cfg: Config, rank: int, step: int) -> list[Batch]:
    """The step's `count` micro-batches, their ids checked on the CPU before the copy (the model
    then need not read them back), with `train.loss_fraction` of the targets kept (`keep_scored`).
    Which ones is a function of the seed, rank and step, so a resumed run draws the same."""
    batches = [check_ids(loader.next_batch(), cfg.model.vocab_size) for _ in range(count)]
    train = cfg.train
    if train.loss_fraction >= 1:
        return batches
    generator = torch.Generator().manual_seed(train.seed * 1_000_003 + rank * 100_003 + step)
    return [keep_scored(b, train.loss_fraction, generator) for b in batches]


def reads_after(train: TrainConfig, step: int, last: bool = False) -> bool:
    """Whether the loop's bookkeeping after `step` reads the device: logs, evaluations and saves do."""
    return last or any(every and step % every == 0 for every in (train.log_every, train.eval_every,
                                                                 train.checkpoint_every))


def supports_found_inf(optimizer: object) -> bool:
    """Whether `optimizer.step()` can skip itself on the device (torch's fused Adam/AdamW can)."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))


def step_if_finite(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """`optimizer.step()` unless `finite` (a 0-d bool on the device) is False; a read only when the
    optimizer cannot skip on the device."""
    if supports_found_inf(optimizer):
        optimizer.found_inf = (~finite).to(torch.float32)  # 1.0 = skip this step
        optimizer.step()
    elif bool(finite):
        optimizer.step()


@dataclass
class StepRecords:
    """Each step's loss and gradient norm since the last read, as device scalars, and the counts
    of skipped steps (host integers, brought up to date by `read`)."""

    max_bad_steps: int
    skipped: int = 0
    bad_in_row: int = 0
    pending: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    last: tuple[float | None, float] = (None, math.nan)  # what the last read returned

    def state_dict(self) -> dict[str, int]:
        """The skip counts as of the last `read` (a save reads first), under state.json's keys."""
        return {"skipped_steps": self.skipped, "bad_in_row": self.bad_in_row}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.bad_in_row = int(state["skipped_steps"]), int(state["bad_in_row"])

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.pending.append((step, loss.detach().float(), grad_norm.detach().float()))

    def read(self, say) -> tuple[float | None, float]:
        """One transfer for all pending steps: the last step's loss (None when it was skipped) and
        gradient norm. Skipped steps are counted and told to `say`; too many in a row raise."""
        if not self.pending:  # read already (a save just before the log line)
            return self.last
        values = torch.stack([torch.stack([loss, norm]) for _, loss, norm in self.pending]).tolist()
        steps = [s for s, _, _ in self.pending]
        self.pending.clear()
        for step, (loss, norm) in zip(steps, values, strict=True):
            if math.isfinite(loss) and math.isfinite(norm):
                self.bad_in_row = 0
                continue
            self.skipped += 1
            self.bad_in_row += 1
            say(f"step {step}: loss {loss} / grad norm {norm} is not finite; step skipped "
                f"({self.bad_in_row} in a row, {self.skipped} in all)")
            if self.bad_in_row >= self.max_bad_steps:
                raise Diverged(step, self.bad_in_row)
        loss, norm = values[-1]
        self.last = (loss if math.isfinite(loss) and math.isfinite(norm) else None), norm
        return self.last


class Diverged(Exception):
    """`max_bad_steps` non-finite steps in a row, the last of them `step`."""

    def __init__(self, step: int, in_row: int) -> None:
        super().__init__(step, in_row)
        self.step, self.in_row = step, in_row

    def for_user(self, lr: float, last_checkpoint: object) -> UserError:
        # Every rank reads the same all-reduced losses, so every rank stops here at the same step.
        return EveryRankError(
            f"training diverged: {self.in_row} steps in a row had a NaN/Inf loss or gradient "
            f"(up to step {self.step}). Lower optim.lr (now {lr:g}) or raise optim.warmup_steps, "
            f"then resume from the last checkpoint ({last_checkpoint or 'none yet'})"
        )
