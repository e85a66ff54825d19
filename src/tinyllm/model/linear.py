"""Linear layers for inference speed: a single bf16 row (batch-1 decoding) as a matrix-vector product."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear, with a single bf16 row (batch-1 decoding) as a matrix-vector product.

    PyTorch sends a one-row F.linear to its GEMM, which in bf16 reads the weights well below the
    bandwidth torch.mv / addmv reach: a seed-size bf16 token took 1.27x less CPU time this way.
    In fp32 it did not pay (0.96x), so fp32 keeps F.linear (its one-row speed comes from the weights'
    layout instead: tinyllm.inference.layout). Under autocast F.linear stays too:
    CPU autocast does not cast addmv's operands.
    """
    if (x.numel() != x.shape[-1] or weight.dtype != torch.bfloat16
            or torch.is_autocast_enabled(x.device.type)):
        return F.linear(x, weight, bias)
    v = x.reshape(-1)  # [K]
    y = torch.mv(weight, v) if bias is None else torch.addmv(bias, weight, v)  # [N]
    return y.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) whose one-row inputs take `linear`'s GEMV."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def replace_linears(root: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> None:
    """Swap every nn.Linear inside `root` for `make(layer)`, in place (int8 or packed inference layers)."""
    for name, module in list(root.named_modules()):
        if isinstance(module, nn.Linear) and name:
            parent_name, _, attr = name.rpartition(".")
            setattr(root.get_submodule(parent_name) if parent_name else root, attr, make(module))
