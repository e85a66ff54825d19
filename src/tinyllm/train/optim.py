"""AdamW with the usual parameter groups, or Muon + AdamW; the learning-rate schedule is in `schedule`.

Why it is shaped this way:
- Weight decay is for matrices that transform activations. Norm gains, biases (all 1-D) and
  embedding tables are left undecayed: decaying an embedding row pulls rarely seen tokens toward
  zero between their updates. A tied output head shares the embedding tensor, so it is counted
  once and goes undecayed with it.
- Muon (`optim.optimizer = "muon"`) orthogonalises the momentum of each hidden weight matrix, so
  every direction of the matrix moves at the same rate. It is defined for 2-D weights that map
  activations to activations, so it takes the block matrices; embeddings, the head, norms and
  biases stay on AdamW. PyTorch's own `torch.optim.Muon` (2.9+) does the work, with its updates
  rescaled to AdamW's RMS ("match_rms_adamw"), so one lr and one schedule drive both halves;
  `optim.adamw_lr_scale` sets the AdamW half's lr apart (at 128 wide that half is 88% of the weights).
"""

from __future__ import annotations

import torch
from torch import nn

from tinyllm.config import OptimConfig
from tinyllm.errors import UserError

# `tinyllm train --nproc` says it before any process starts (`train.launch`); torchrun started by hand, here.
MUON_SHARDED = ("optim.optimizer = \"muon\" needs whole weight matrices; FSDP shards them: use --parallel ddp, "
                "or optim.optimizer = \"adamw\" with FSDP")


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


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer | MuonAdamW:
    """AdamW over `param_groups`, or (`cfg.optimizer == "muon"`) Muon for block matrices + AdamW for the rest."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "muon":
        return _muon_hybrid(groups, model, cfg, device)
    return _adamw(groups, cfg, device)


def _adamw(groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    kwargs = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    if cfg.fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # no fused kernel for this device or torch build
            pass
    # foreach=None lets torch pick its multi-tensor path where it can.
    return torch.optim.AdamW(groups, **kwargs)


def _muon_hybrid(groups: list[dict], model: nn.Module, cfg: OptimConfig, device: torch.device) -> MuonAdamW:
    muon_cls = getattr(torch.optim, "Muon", None)
    if muon_cls is None:
        raise UserError(f"optim.optimizer = \"muon\" needs torch.optim.Muon (PyTorch 2.9 or newer; this is "
                        f"{torch.__version__}): upgrade torch or use optim.optimizer = \"adamw\"")
    head = getattr(model, "head_weight", None)  # the vocabulary projection is an output layer: AdamW's
    decay = groups[0]["params"]
    if any(type(p).__name__ == "DTensor" for p in decay):
        raise UserError(MUON_SHARDED)
    matrices = [p for p in decay if p.dim() == 2 and p is not head]
    rest = [p for p in decay if p.dim() != 2 or p is head]
    adamw_groups = [{"params": rest, "weight_decay": cfg.weight_decay}, groups[1]]
    muon = muon_cls(matrices, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=0.95, nesterov=True,
                    adjust_lr_fn="match_rms_adamw")
    return MuonAdamW(muon, _adamw([g for g in adamw_groups if g["params"]], cfg, device), cfg.adamw_lr_scale)


class MuonAdamW:
    """Two optimizers stepped as one: Muon for the block matrices, AdamW for everything else.

    Its `param_groups` are both optimizers' groups (Muon's first), so the schedule sets every lr,
    AdamW's times `adamw_lr_scale` (optim.adamw_lr_scale, kept in its groups as "lr_scale"); its
    state dict keeps the two halves apart, so a checkpoint restores each into its own.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer, adamw_lr_scale: float = 1.0) -> None:
        self.muon, self.adamw, self.adamw_lr_scale = muon, adamw, adamw_lr_scale
        self._scale_adamw()

    def _scale_adamw(self) -> None:
        # Absent at 1, so state dicts are as they were before the option; set again after a load,
        # so the config decides, not the checkpoint.
        for group in self.adamw.param_groups:
            group.pop("lr_scale", None)
            if self.adamw_lr_scale != 1.0:
                group["lr_scale"] = self.adamw_lr_scale

    @property
    def param_groups(self) -> list[dict]:
        # The halves' own group dicts (load_state_dict replaces them), so an lr set here is the one they use.
        return [*self.muon.param_groups, *self.adamw.param_groups]

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"muon", "adamw"}:
            raise ValueError("the saved optimizer state is AdamW's alone, not Muon + AdamW: resume with "
                             "the optimizer the run was started with (optim.optimizer)")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])
        self._scale_adamw()

