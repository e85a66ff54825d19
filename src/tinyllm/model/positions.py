"""Where each token sits: rotary position tables, and documents within a packed row.

Why a module of its own: both are pure functions of positions or ids, shared by the attention
layer and the model's forward, and computed per forward on the device (tiny, no host reads, fp32
whatever dtype the model is cast to).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tinyllm.tokenizer import EOT


def rope_cos_sin(head_dim: int, pos: Tensor, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles for positions pos [T] ([T, hd/2] each), or pos [B, T]
    (rows at their own positions: [B, 1, T, hd/2], to broadcast over heads).

    Computed per forward rather than stored: it is tiny, and keeps the tables fp32 whatever dtype
    the model is cast to.
    """
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, dtype=torch.float32, device=pos.device) / head_dim
    )
    angles = pos.float()[..., None] * inv_freq  # [..., T, head_dim/2]
    if pos.dim() == 2:
        angles = angles[:, None]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, H, T, hd] by position; pairs are (i, i + hd/2) (the Llama / NeoX layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)  # [B, H, T, hd/2] each
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


def document_positions(idx: Tensor) -> Tensor:
    """[B, T] each token's position within its document, counted from its <|endoftext|> (0), as
    it would be alone; tokens before a row's first <|endoftext|> count from the row's start."""
    pos = torch.arange(idx.shape[1], device=idx.device)
    return pos - torch.where(idx == EOT, pos, 0).cummax(dim=1).values


def document_mask(idx: Tensor) -> Tensor:
    """[B, 1, T, T] causal attention that stops at each document's start (an <|endoftext|>, which
    belongs to the document it begins). Built on the device from the ids: no host read."""
    doc = (idx == EOT).cumsum(dim=1)  # [B, T] which document each token is in
    causal = torch.ones(idx.shape[1], idx.shape[1], dtype=torch.bool, device=idx.device).tril()
    return (doc[:, None, :, None] == doc[:, None, None, :]) & causal
