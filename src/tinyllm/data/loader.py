"""Batches from prepared shards: memory-mapped, mixed by weight, exactly resumable, rank-disjoint.

Why it is shaped this way:
- A batch is made of rows, and every row is one *unit* of one source: in `packed` mode a window
  of context+1 tokens of that source's token stream (windows start every `context` tokens, so
  each token is a target exactly once per epoch and documents run back to back across their
  `<|endoftext|>`); in `padded` mode one document cut to context+1 tokens.
- The row sequence is global and a pure function of the seed: global row g takes its source from
  a seeded draw over the weights (or, with `sequential=True`, from a fixed weighted round-robin),
  and each source hands out its units in a seeded permutation per epoch (in order when
  sequential). Rank r of W takes rows r*B..(r+1)*B-1 of each step's B*W rows, so ranks never see
  the same unit within an epoch, and the position is just "rows consumed" plus a cursor per
  source: that is the whole `state_dict`, and restoring it continues exactly (even with another
  batch size or world size).
- Shards are opened once (checked against the manifest's sizes and CRC-32) and memory-mapped;
  only the rows of a batch are ever copied.
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinyllm.data.manifest import SPLITS, load_manifest
from tinyllm.data.prepare import default_builtin_dataset
from tinyllm.data.shards import Shard
from tinyllm.errors import UserError
from tinyllm.tokenizer import PAD, VOCAB_SIZE

__all__ = ["Batch", "TokenLoader", "load_manifest", "default_builtin_dataset"]

MODES = ("packed", "padded")
STATE_VERSION = 1
_BLOCK = 4096  # rows per seeded draw of sources


@dataclass
class Batch:
    inputs: torch.Tensor  # int64 [B, T]
    targets: torch.Tensor  # int64 [B, T]; -1 where no loss (pad positions)


class _SourceSplit:
    """One source's split: its shards seen as one token stream and one list of documents."""

    def __init__(self, data_dir: Path, name: str, split: dict, mode: str, context: int) -> None:
        self.name = name
        self.shards = [Shard(data_dir / s["file"], VOCAB_SIZE, expect=s) for s in split["shards"]]
        self.tok_starts = np.cumsum([0] + [s.n_tokens for s in self.shards])  # [S + 1]
        self.doc_starts = np.cumsum([0] + [s.n_docs for s in self.shards])  # [S + 1]
        self.n_tokens, self.n_docs = int(self.tok_starts[-1]), int(self.doc_starts[-1])
        self.mode, self.context = mode, context
        self.n_units = (self.n_tokens - 1) // context if mode == "packed" else self.n_docs
        self.n_units = max(self.n_units, 0)

    def unit(self, i: int) -> np.ndarray:
        """Row i of this source: a window of context+1 tokens, or a document cut to context+1."""
        if self.mode == "packed":
            return self._tokens(i * self.context, i * self.context + self.context + 1)
        s = int(np.searchsorted(self.doc_starts, i, side="right")) - 1
        return self.shards[s].document(i - int(self.doc_starts[s]))[: self.context + 1]

    def _tokens(self, a: int, b: int) -> np.ndarray:
        s = int(np.searchsorted(self.tok_starts, a, side="right")) - 1
        pieces = []
        while a < b:  # a window may straddle shards
            lo = a - int(self.tok_starts[s])
            hi = min(b, int(self.tok_starts[s + 1])) - int(self.tok_starts[s])
            pieces.append(self.shards[s].tokens[lo:hi])
            a, s = int(self.tok_starts[s]) + hi, s + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


class TokenLoader:
    """Batches of one split of a prepared dataset (see the module docstring for the design)."""

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, context: int, *,
                 mode: str = "packed", seed: int = 0, rank: int = 0, world_size: int = 1,
                 sequential: bool = False) -> None:
        _check_args(split, batch_size, context, mode, rank, world_size)
        self.data_dir = Path(data_dir)
        self._manifest = load_manifest(self.data_dir)
        self.split, self.batch_size, self.context, self.mode = split, batch_size, context, mode
        self.seed, self.rank, self.world_size, self.sequential = seed, rank, world_size, sequential
        self._sources = self._open_sources()
        w = np.array([self._manifest["sources"][s.name]["weight"] for s in self._sources], dtype=np.float64)
        self._weights = w / w.sum()
        self._rows = 0  # global rows consumed (all ranks)
        self._cursors = [0] * len(self._sources)  # units each source has handed out (all ranks)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, its permutation)
        self._block: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))

    @property
    def manifest(self) -> dict:
        return self._manifest

    def _open_sources(self) -> list[_SourceSplit]:
        opened, short = [], []
        for name, entry in self._manifest["sources"].items():
            src = _SourceSplit(self.data_dir, name, entry["splits"][self.split], self.mode, self.context)
            (opened if src.n_units > 0 else short).append(src)
        for src in short:
            need = f"{self.context + 1} tokens for one row" if self.mode == "packed" else "one document"
            msg = (f"{self.data_dir}: the {self.split} split of source {src.name} has {src.n_tokens} tokens in "
                   f"{src.n_docs} documents, less than {need}")
            if self.split == "train" or not opened:
                fix = "prepare more data (raise --max-tokens) or use a smaller context"
                if src.n_docs == 0:
                    fix = "prepare it again with more data or a larger --val-fraction"
                raise UserError(f"{msg}: {fix}")
            warnings.warn(f"{msg}; it is left out of {self.split} batches", stacklevel=3)
        if not opened:
            raise UserError(f"{self.data_dir} has no sources: run tinyllm prepare --out {self.data_dir} again")
        return opened

    # -- the row sequence ----------------------------------------------------------------------
    def _source_of(self, g: int) -> int:
        """Which source global row g comes from."""
        if self.sequential:
            # Weighted round-robin: the source furthest behind its share goes next.
            return int(np.argmax(self._weights * (g + 1) - np.array(self._cursors)))
        block, within = divmod(g, _BLOCK)
        if self._block[0] != block:
            rng = np.random.default_rng([self.seed, 0x5EED, block])
            self._block = (block, rng.choice(len(self._sources), size=_BLOCK, p=self._weights))
        return int(self._block[1][within])

    def _next_unit(self, s: int) -> int:
        src = self._sources[s]
        epoch, k = divmod(self._cursors[s], src.n_units)
        self._cursors[s] += 1
        if self.sequential:
            return k
        if self._perms.get(s, (None,))[0] != epoch:
            rng = np.random.default_rng([self.seed, zlib.crc32(src.name.encode()), epoch])
            perm = np.arange(src.n_units, dtype=np.int64)
            rng.shuffle(perm)
            self._perms[s] = (epoch, perm)
        return int(self._perms[s][1][k])

    def next_batch(self) -> Batch:
        B = self.batch_size
        mine = range(self.rank * B, (self.rank + 1) * B)
        rows = []
        for j in range(B * self.world_size):  # every rank walks all rows to keep cursors global
            s = self._source_of(self._rows + j)
            unit = self._next_unit(s)
            if j in mine:
                rows.append(self._sources[s].unit(unit))
        self._rows += B * self.world_size
        return _packed(rows) if self.mode == "packed" else _padded(rows)

    # -- position ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "mode": self.mode,
            "context": self.context,
            "seed": self.seed,
            "sequential": self.sequential,
            "rows": self._rows,
            "cursors": {s.name: c for s, c in zip(self._sources, self._cursors, strict=True)},
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise UserError("the saved data-loader position is not one this tinyllm wrote: start the run afresh")
        for key in ("split", "mode", "context", "seed", "sequential"):
            if state.get(key) != getattr(self, key):
                raise UserError(
                    f"the saved data position is for {key} {state.get(key)!r}, this run has {getattr(self, key)!r}: "
                    f"resume with the same setting"
                )
        names = [s.name for s in self._sources]
        if sorted(state["cursors"]) != sorted(names):
            raise UserError(
                f"the saved data position covers sources {', '.join(state['cursors'])}, but {self.data_dir} "
                f"has {', '.join(names)}: resume with the dataset the run started with"
            )
        self._rows = int(state["rows"])
        self._cursors = [int(state["cursors"][n]) for n in names]


def _check_args(split: str, batch_size: int, context: int, mode: str, rank: int, world_size: int) -> None:
    if split not in SPLITS:
        raise UserError(f"split {split!r} does not exist: use one of {', '.join(SPLITS)}")
    if mode not in MODES:
        raise UserError(f"data mode {mode!r} is unknown: use packed or padded")
    if batch_size < 1 or context < 1:
        raise UserError(f"batch size ({batch_size}) and context ({context}) must be at least 1")
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside 0..{world_size - 1} (world size {world_size})")


def _packed(rows: list[np.ndarray]) -> Batch:
    w = torch.from_numpy(np.stack(rows).astype(np.int64))  # [B, T + 1]
    return Batch(inputs=w[:, :-1].contiguous(), targets=w[:, 1:].contiguous())


def _padded(rows: list[np.ndarray]) -> Batch:
    width = max(len(r) for r in rows) - 1  # the batch's longest row, as (input, target) pairs; <= T
    inputs = np.full((len(rows), width), PAD, dtype=np.int64)  # [B, width]
    targets = np.full((len(rows), width), -1, dtype=np.int64)  # [B, width]; -1: no loss
    for i, r in enumerate(rows):
        inputs[i, : len(r) - 1] = r[:-1]
        targets[i, : len(r) - 1] = r[1:]
    return Batch(inputs=torch.from_numpy(inputs), targets=torch.from_numpy(targets))
