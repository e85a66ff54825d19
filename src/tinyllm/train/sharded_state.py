"""Full weights and optimizer state from a sharded (FSDP2) model: for samples and the one-file checkpoint.

Why it is shaped this way: checkpoints keep the one-file format of single-process runs, so
`sample`, `export` and a resume with any number of processes (the loader's position counts rows
globally) read every checkpoint alike. DDP's rank 0 holds the whole model already and passes
through untouched; FSDP2 gathers full state dicts to rank 0's CPU (`get_model_state_dict(
full_state_dict=True, cpu_offload=True)`), and its optimizer state is renamed from parameter names
back to the index-keyed layout `torch.optim` writes (`_by_index`), and forth on loading
(`_by_name`). Gathering is a collective: every rank calls these functions, rank 0 gets the result.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tinyllm.errors import UserError
from tinyllm.model.gpt import GPT
from tinyllm.train.distributed import Dist


def _full_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model(model: nn.Module, d: Dist) -> nn.Module | None:
    """A model rank 0 can run alone (for samples); None on other ranks. FSDP: all ranks must call it."""
    if not d.sharded:
        return model if d.is_main else None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_options())  # collective; full tensors on rank 0's CPU
    if not d.is_main:
        return None
    copy = GPT(model.config)
    copy.load_state_dict(state)
    return copy


def checkpoint_states(model: nn.Module, optimizer: torch.optim.Optimizer, d: Dist) -> tuple[Any, Any]:
    """What rank 0 saves: the model and optimizer themselves, or (FSDP) their gathered full state dicts."""
    if not d.sharded:
        return model, optimizer
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    weights = get_model_state_dict(model, options=_full_options())
    optim = get_optimizer_state_dict(model, optimizer, options=_full_options())
    return weights, _by_index(optim, _param_names(model, optimizer)) if d.is_main else None


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optim_state: dict) -> None:
    """Load full (single-file) weights and optimizer state into an FSDP2-sharded model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    set_model_state_dict(model, weights, options=_full_options())
    by_name = _by_name(optim_state, _param_names(model, optimizer))
    set_optimizer_state_dict(model, optimizer, by_name, options=_full_options())


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order: index i of `optimizer.state_dict()` is names[i]."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _by_index(state: dict, names: list[str]) -> dict:
    """Name-keyed optimizer state (torch.distributed.checkpoint) -> index-keyed (torch.optim)."""
    index = {n: i for i, n in enumerate(names)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups}


def _by_name(state: dict, names: list[str]) -> dict:
    """Index-keyed optimizer state (torch.optim) -> name-keyed (torch.distributed.checkpoint)."""
    try:
        groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
        return {"state": {names[int(i)]: s for i, s in state["state"].items()}, "param_groups": groups}
    except (IndexError, KeyError, TypeError) as e:
        raise UserError(f"the saved optimizer state does not fit this model's parameters ({e}): resume from "
                        "a checkpoint of this model") from None
