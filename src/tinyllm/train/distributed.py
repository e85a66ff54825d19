"""Data-parallel training across the processes torchrun starts: DDP, or FSDP2 for big models.

This module is how one process takes part: joining the process group, wrapping the model, and
the collectives through which all ranks agree. Gathering FSDP2 shards into the one-file checkpoint
is `sharded_state`; starting torchrun for `tinyllm train --nproc N` is `launch`; the batch split
over the processes (`train.batch_tokens` -> grad_accum) is planned in `run_plan`.

Why it is shaped this way:
- One `Dist` value says how this process takes part: alone (no torchrun environment: no process
  group, and every helper here is a no-op, so a single process trains exactly as it always
  did), as a DDP replica, or as an FSDP2 shard holder. The trainer asks it questions (`is_main`,
  `sharded`) instead of reading the environment itself.
- The data is split by the loader (rank r reads its own rows of each global batch) and the
  gradient is averaged by DDP/FSDP, so with equal-sized packed micro-batches N processes compute
  the very step one process computes on the same global batch. Gradient accumulation skips the
  all-reduce on all but the last micro-step (`grad_sync`).
- Every decision that ends or shapes the loop is taken once for all ranks: the step's loss is
  all-reduced (so a NaN on one rank is a NaN on all, and they skip the step together), stopping
  (time budget, Ctrl-C) is an all-reduced max, a fitted schedule comes from rank 0. A rank that
  decided alone would leave the others waiting in a collective forever.
- Every rank reads a checkpoint itself (`check_same_start`), so multi-node runs need the run
  directory on a shared filesystem.
- All ranks start from the same seed, so they build the same initial weights; the same RNG also
  means dropout masks repeat across ranks, the price of a checkpoint's one RNG state resuming
  every rank exactly.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tinyllm.errors import UserError
from tinyllm.model.gpt import GPT

MODES = ("ddp", "fsdp")
# Why a loop stops, by precedence: the all-reduced max of these codes is what every rank does.
_STOP_REASONS = (None, "time budget", "interrupted")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    mode: str = "single"  # "single" (no torchrun), "ddp" or "fsdp"

    @property
    def active(self) -> bool:
        return self.mode != "single"

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, samples and writes non-sharded files."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    def describe(self, short: bool = False) -> str:
        """For the run's first line: ', DDP over 2 processes' (short: the batch factor '2 processes x '); '' alone."""
        if not self.active:
            return ""
        n = f"{self.world_size} process{'es' if self.world_size > 1 else ''}"  # torchrun --nproc-per-node=1 too
        return f"{n} x " if short else f", {'FSDP2' if self.sharded else 'DDP'} over {n}"


def launched() -> bool:
    """True in a process started by torchrun (it sets RANK, LOCAL_RANK, WORLD_SIZE)."""
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def setup(device: torch.device, mode: str) -> tuple[Dist, torch.device]:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU); alone without torchrun."""
    if not launched():
        return Dist(), device
    rank, local, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if mode not in MODES:
        raise UserError(f"train.parallel {mode!r} is unknown: use {' or '.join(MODES)}")
    if device.type == "mps":
        raise UserError("torchrun training does not run on MPS: use --set train.device=cpu")
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(f"local rank {local} has no GPU of its own (this node has {torch.cuda.device_count()}): "
                            "start at most one process per GPU (--nproc-per-node / --nproc)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Dist(rank, local, world, mode), device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -- the model ----------------------------------------------------------------------------------


def wrap(model: GPT, d: Dist, device: torch.device) -> nn.Module:
    """The module to run forward/backward through: `model` itself, DDP around it, or it FSDP2-sharded in place."""
    if not d.active:
        return model
    if d.mode == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (d.world_size,))
    # One unit per block: only one block's full weights are ever gathered at a time; the root
    # unit holds the embeddings, final norm and head.
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def grad_sync(wrapped: nn.Module, d: Dist, enabled: bool) -> Iterator[None]:
    """Forward+backward of one micro-step; `enabled=False` keeps its gradient local (not the last micro-step)."""
    if not d.active or enabled:
        yield
    elif d.mode == "ddp":
        with wrapped.no_sync():
            yield
    else:
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)


def clip_grad_norm(model: nn.Module, max_norm: float, d: Dist) -> torch.Tensor:
    """The global gradient norm (clipped to max_norm), a device scalar (not read back); equal on every rank."""
    if not d.sharded:  # DDP gradients are already identical on every rank
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if isinstance(norm, DTensor):  # the norm of sharded gradients: reduce it to one value
        norm = norm.full_tensor()
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


# -- agreeing -----------------------------------------------------------------------------------


def _device(d: Dist) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def mean_across(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """The mean of a scalar over ranks (itself when alone)."""
    if not d.active:
        return value
    out = value.detach().clone()
    dist.all_reduce(out)
    return out / d.world_size


def sum_across(values: list[float], d: Dist) -> list[float]:
    """Element-wise sums over ranks, in float64."""
    if not d.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_device(d))
    dist.all_reduce(t)
    return t.tolist()


def agree_on_next_step(reason: str | None, progress: float | None, d: Dist) -> tuple[str | None, float | None]:
    """What all ranks act on after a step: the stop reason (any rank's, Ctrl-C over the time budget
    over none) and rank 0's `progress` (in [0, 1], or None) for the schedule's next step.

    One all-reduce for both, as both are needed every step: the other ranks send -1, below any
    progress, so the maximum is rank 0's."""
    if not d.active:
        return reason, progress
    code = _STOP_REASONS.index(reason) if reason in _STOP_REASONS else len(_STOP_REASONS) - 1
    mine = progress if d.is_main and progress is not None else -1.0
    t = torch.tensor([code, mine], dtype=torch.float64, device=_device(d))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    agreed_code, agreed = t.tolist()
    return _STOP_REASONS[int(agreed_code)], (agreed if agreed >= 0 else None)


def from_main(value: Any, d: Dist) -> Any:
    """Rank 0's value (any picklable object) on every rank."""
    if not d.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_same_start(resume_from: Path | None, d: Dist) -> None:
    """Every rank must continue the same checkpoint (or none); else they do not share the run directory."""
    mine = str(resume_from) if resume_from is not None else None
    main = from_main(mine, d)
    if main != mine:
        raise UserError(f"rank {d.rank} continues from {mine or 'no checkpoint'} but rank 0 from {main or 'none'}: "
                        "with several machines, put --out RUN_DIR on a filesystem they all share")
