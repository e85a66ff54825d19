"""Preallocated per-layer key/value cache for incremental decoding.

Why preallocated: decoding appends one position per step; growing tensors with `torch.cat` would
copy the whole cache every step (quadratic traffic). One [n_layer, batch, n_head, max_len,
head_dim] buffer for keys and one for values are allocated once, and attention writes the new
positions in place and reads a view of the filled prefix.

Protocol (used by `tinyllm.model.gpt`): during one forward of T new tokens every layer calls
`update(layer, k, v)` at the same offset `length`; the model calls `advance(T)` once after the last
layer. Between forwards the cache holds exactly `length` positions for every layer.

`BatchKVCache` holds independent sequences of different lengths, one per row (the server's
running requests); the model asks any cache for the new tokens' `positions` and its `key_mask`.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys and values of the positions seen so far, for every layer."""

    # Which keys each row may attend to, [B, 1, 1, keys]; None: every row has all `length` keys.
    key_mask: Tensor | None = None

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

    def positions(self, t: int) -> Tensor:
        """Positions [t] of the next `t` tokens: every row continues at `length`."""
        return torch.arange(self.length, self.length + t, device=self.k.device)

    def reset(self) -> None:
        """Forget all positions; the buffers are kept for reuse."""
        self.length = 0


class BatchKVCache(KVCache):
    """Independent sequences, one per row, each at its own length; rows join and leave.

    A row joins with the keys and values of its prompt, prefilled alone in a batch-1 `KVCache`
    (`put`), and leaves with `remove`. Each forward then feeds exactly one token per row, written
    at that row's own length, at that row's own position, attending to that row's keys only.
    Rows are right-padded: row b's keys fill slots 0 .. lengths[b] - 1 and the slots after them
    are masked out. With left padding every row would write at one shared slot, but a row joining
    with a prompt longer than the others would shift every other row's cache to make room; here
    joining copies one row and leaving moves the last row into the gap, never anyone else.
    `length` is the longest row, so the model's context check covers every row.
    """

    def __init__(self, like: KVCache) -> None:
        _, _, n_head, max_len, head_dim = like.k.shape
        super().__init__(like.n_layer, 1, n_head, max_len, head_dim, like.k.dtype, like.k.device)
        self.lengths: list[int] = []  # host copy, so sizing a step reads nothing from the device
        self._sync()

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def put(self, row: int, src: KVCache) -> None:
        """Make row `row` (or a new last row, when `row` == batch) hold `src`'s first sequence."""
        if not 0 <= row <= self.batch or src.length > self.max_len:
            raise ValueError(f"row {row} of {self.batch}, or {src.length} > {self.max_len} positions")
        if row == self.batch:
            self._grow(row + 1)
            self.lengths.append(0)
        n = src.length
        self.k[:, row, :, :n] = src.k[:, 0, :, :n]
        self.v[:, row, :, :n] = src.v[:, 0, :, :n]
        self.lengths[row] = n
        self._sync()

    def remove(self, row: int) -> None:
        """Drop row `row`; the last row moves into its place (callers renumber it)."""
        last = self.batch - 1
        if row != last:
            n = self.lengths[last]
            self.k[:, row, :, :n] = self.k[:, last, :, :n]
            self.v[:, row, :, :n] = self.v[:, last, :, :n]
            self.lengths[row] = n
        self.lengths.pop()
        self._sync()

    def check_room(self, t: int) -> None:
        if t != 1:
            raise ValueError(f"a BatchKVCache takes one new token per row, got {t}")
        if self.batch and max(self.lengths) + 1 > self.max_len:
            raise ValueError(f"KV cache overflow: a row of {max(self.lengths)} + 1 > {self.max_len}")

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store each row's new k, v [B, H, 1, hd] at its own length; all keys [B, H, keys, hd]."""
        self.check_room(k.shape[2])
        rows = torch.arange(self.batch, device=k.device)
        # Indices on both sides of the head slice: the indexed view is [B, H, hd].
        self.k[layer][rows, :, self._lengths_t] = k[:, :, 0]
        self.v[layer][rows, :, self._lengths_t] = v[:, :, 0]
        end = self.length + 1
        return self.k[layer, : self.batch, :, :end], self.v[layer, : self.batch, :, :end]

    def advance(self, t: int) -> None:
        self.check_room(t)
        self.lengths = [n + 1 for n in self.lengths]
        self._sync()

    def positions(self, t: int) -> Tensor:
        """Each row's position for its one new token, [B, 1]."""
        self.check_room(t)
        return self._lengths_t[:, None]

    def reset(self) -> None:
        self.lengths = []
        self._sync()

    def _sync(self) -> None:
        self.length = max(self.lengths, default=0)
        self._lengths_t = torch.tensor(self.lengths, dtype=torch.long, device=self.k.device)
        # Row b sees its filled slots and the slot its new token is written to: [B, 1, 1, keys].
        keys = torch.arange(self.length + 1, device=self.k.device)
        self.key_mask = (keys <= self._lengths_t[:, None])[:, None, None, :]

    def _grow(self, rows: int) -> None:
        if rows <= self.k.shape[1]:
            return
        # Doubling keeps the copies to a few; a server's batch rarely shrinks for long.
        shape = list(self.k.shape)
        shape[1] = max(rows, 2 * shape[1])
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.zeros(shape, dtype=old.dtype, device=old.device)
            new[:, : old.shape[1]] = old
            setattr(self, name, new)
