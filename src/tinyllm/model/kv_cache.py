"""Preallocated per-layer key/value cache for incremental decoding.

Why preallocated: decoding appends one position per step; growing tensors with `torch.cat` would
copy the whole cache every step (quadratic traffic). One [n_layer, batch, n_head, max_len,
head_dim] buffer for keys and one for values are allocated once, and attention writes the new
positions in place and reads a view of the filled prefix.

Protocol (used by `tinyllm.model.gpt`): during one forward of T new tokens every layer calls
`update(layer, k, v)` at the same offset `length`; the model calls `advance(T)` once after the last
layer. Between forwards the cache holds exactly `length` positions for every layer.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys and values of the positions seen so far, for every layer."""

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        for name, value in (
            ("n_layer", n_layer),
            ("batch", batch),
            ("n_head", n_head),
            ("max_len", max_len),
            ("head_dim", head_dim),
        ):
            if value < 1:
                raise ValueError(f"KVCache {name} must be >= 1, got {value}")
        shape = (n_layer, batch, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def n_layer(self) -> int:
        return self.k.shape[0]

    def check_room(self, t: int) -> None:
        """Raise ValueError unless `t` more positions fit."""
        if self.length + t > self.max_len:
            raise ValueError(
                f"KV cache overflow: {self.length} cached + {t} new positions > max_len {self.max_len}"
            )

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new k, v [B, H, T, hd] of `layer` after the cached ones.

        Returns views of all keys and values of this layer so far, [B, H, length + T, hd], in the
        cache's dtype.
        """
        t = k.shape[2]
        self.check_room(t)
        end = self.length + t
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, t: int) -> None:
        """Mark `t` more positions as filled (after every layer has stored them)."""
        self.check_room(t)
        self.length += t

    def reset(self) -> None:
        """Forget all positions; the buffers are kept for reuse."""
        self.length = 0
