"""AdamW with the usual parameter groups, and the learning-rate schedule.

Why it is shaped this way:
- Weight decay is for matrices that transform activations. Norm gains, biases (all 1-D) and
  embedding tables are left undecayed: decaying an embedding row pulls rarely seen tokens toward
  zero between their updates. A tied output head shares the embedding tensor, so it is counted
  once and goes undecayed with it.
- The schedule is a pure function of the step plus one piece of state, its horizon. The horizon
  can be shortened once to fit a wall-clock budget, so it is saved in checkpoints with the rest.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tinyllm.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices, and everything else (norms, biases, embeddings)."""
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for p in model.parameters():  # parameters() yields a shared (tied) tensor once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in embedding_ids else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `param_groups`, with the fused kernel when `cfg.fused` and the device has one."""
    groups = param_groups(model, cfg.weight_decay)
    kwargs = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    if cfg.fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # no fused kernel for this device or torch build
            pass
    # foreach=None lets torch pick its multi-tensor path where it can.
    return torch.optim.AdamW(groups, **kwargs)


class LRSchedule:
    """Linear warmup from lr/warmup to lr, then cosine decay to lr * min_lr_ratio (or constant).

    `lr_at(step)` is the rate for the update at 0-based `step`; the last step of the horizon
    (`total_steps - 1`) gets exactly the floor, and later steps stay there.
    """

    def __init__(self, cfg: OptimConfig, total_steps: int) -> None:
        self.base_lr = cfg.lr
        self.kind = cfg.schedule
        self.warmup_steps = cfg.warmup_steps
        self.min_lr = cfg.lr * cfg.min_lr_ratio
        self.total_steps = total_steps

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.base_lr
        span = max(1, self.total_steps - 1 - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's lr for the update at `step`; returns it."""
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {"total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        self.total_steps = int(state["total_steps"])
