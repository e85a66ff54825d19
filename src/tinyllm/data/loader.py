"""Batches from prepared shards: memory-mapped, mixed by weight, exactly resumable, rank-disjoint.

Why it is shaped this way:
- A batch is made of rows, and every row is one *unit* of one source: in `packed` mode a window
  of context+1 tokens of that source's token stream (windows start every `context` tokens, so
  each token is a target exactly once per epoch and documents run back to back across their
  `<|endoftext|>`); in `padded` mode `<|endoftext|>` then one document, cut to context+1
  tokens. That first token is what a document follows in a packed stream and what every prompt
  starts with (`Tokenizer.prompt_ids`), so a model meets a document's start the same way in
  either mode and at inference.
- The row sequence is global and a pure function of the seed: global row g takes its source from
  a seeded draw over the weights (or, with `sequential=True`, from a fixed weighted round-robin),
  and each source hands out its units in a seeded permutation per epoch (in order when
  sequential). Rank r of W takes rows r*B..(r+1)*B-1 of each step's B*W rows, so ranks never see
  the same unit within an epoch, and the position is just "rows consumed" plus a cursor per
  source: that is the whole `state_dict`, and restoring it continues exactly (even with another
  batch size or world size).
- Evaluation does not draw rows at all: `eval_pass` walks each source's units in order, each
  exactly once, in batches that never mix sources. Drawing by weight (even round-robin) would
  wrap a small source around many times within a "pass" of the total row count and never reach
  most of a large one; 10 val rows at weight 3 beside 1,000 at weight 1 scored 262 distinct rows.
- A dataset prepared with `--val-source` has sources of one split each (the manifest's
  "split"): a split's loader opens only the sources that hold it, so the train mix is the train
  sources' and a val pass scores the val sources', with no warning about the other side's
  empty split.
- Shards are opened once (checked against the manifest's sizes and CRC-32) and memory-mapped;
  only the rows of a batch are ever copied.
- `loss_on="assistant"` (chat fine-tuning) sets a target to -1 unless the shard's mask marks
  the target token as the assistant's. A row with no such target would cost a forward pass
  and teach nothing (about half the builtin stories have no questions), so in that mode a
  source's units are only the windows or documents with at least one assistant target, found
  once from the masks when the loader opens. Every row, so every batch, then has a target: no
  0/0 loss ever reaches the trainer. The unit list is a pure function of the data, context and
  mode, so the position stays "rows consumed" plus cursors, exactly resumable.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinyllm.data.manifest import SPLITS, load_manifest
from tinyllm.data.shards import Shard
from tinyllm.errors import UserError
from tinyllm.tokenizer import EOT, PAD, VOCAB_SIZE

__all__ = ["Batch", "TokenLoader", "load_manifest"]

MODES = ("packed", "padded")
LOSS_ON = ("all", "assistant")
STATE_VERSION = 1
_BLOCK = 4096  # rows per seeded draw of sources
WIDTH_BUCKET = 64  # padded batches are a multiple of this many tokens wide (up to the context)


@dataclass
class Batch:
    inputs: torch.Tensor  # int64 [B, T]
    targets: torch.Tensor  # int64 [B, T]; -1 where no loss (pad positions; with loss_on="assistant", non-assistant tokens)


class _SourceSplit:
    """One source's split: its shards seen as one token stream and one list of documents."""

    def __init__(self, data_dir: Path, name: str, split: dict, mode: str, context: int, loss_on: str) -> None:
        self.name = name
        self.shards = [Shard(data_dir / s["file"], VOCAB_SIZE, expect=s) for s in split["shards"]]
        self.tok_starts = np.cumsum([0] + [s.n_tokens for s in self.shards])  # [S + 1]
        self.doc_starts = np.cumsum([0] + [s.n_docs for s in self.shards])  # [S + 1]
        self.n_tokens, self.n_docs = int(self.tok_starts[-1]), int(self.doc_starts[-1])
        self.mode, self.context, self.masked = mode, context, loss_on == "assistant"
        if self.masked and not all(s.has_mask for s in self.shards):
            raise UserError(
                f"{data_dir} was prepared by an older tinyllm that did not record which tokens are the "
                f"assistant's: run tinyllm prepare again into a new directory to train on assistant tokens only"
            )
        self.n_rows = max((self.n_tokens - 1) // context if mode == "packed" else self.n_docs, 0)
        # Units in assistant mode: the rows that have an assistant target (module docstring).
        self.units = np.flatnonzero(self._assistant_targets(self.n_rows)) if self.masked else None
        self.n_units = len(self.units) if self.units is not None else self.n_rows

    def _row_range(self, i: int) -> tuple[int, int]:
        """Global token range of row i: a window of context+1 tokens, or a document cut to context
        (`unit` puts <|endoftext|> before it)."""
        if self.mode == "packed":
            return i * self.context, i * self.context + self.context + 1
        s = int(np.searchsorted(self.doc_starts, i, side="right")) - 1
        off = self.shards[s].offsets
        k, base = i - int(self.doc_starts[s]), int(self.tok_starts[s])
        start, end = base + int(off[k]), base + int(off[k + 1])
        return start, min(end, start + self.context)

    def unit(self, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Unit k's tokens [n], and in assistant mode its mask [n] (bool: token is the assistant's)."""
        i = int(self.units[k]) if self.units is not None else k
        a, b = self._row_range(i)
        tokens = self._gather(a, b, lambda sh, lo, hi: sh.tokens[lo:hi])
        mask = self._gather(a, b, Shard.assistant) if self.masked else None
        if self.mode == "padded":
            tokens = np.concatenate([np.array([EOT], dtype=tokens.dtype), tokens])
            mask = None if mask is None else np.concatenate([[False], mask])
        return tokens, mask

    def _gather(self, a: int, b: int, read) -> np.ndarray:
        """read(shard, lo, hi) over global tokens a..b-1, which may straddle shards."""
        s = int(np.searchsorted(self.tok_starts, a, side="right")) - 1
        pieces = []
        while a < b:
            lo = a - int(self.tok_starts[s])
            hi = min(b, int(self.tok_starts[s + 1])) - int(self.tok_starts[s])
            pieces.append(read(self.shards[s], lo, hi))
            a, s = int(self.tok_starts[s]) + hi, s + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _assistant_targets(self, n: int) -> np.ndarray:
        """bool [n]: whether row i has an assistant token among its targets (tokens 1.. of the row)."""
        if n == 0:
            return np.zeros(0, dtype=bool)
        if self.mode == "padded":
            firsts = [int(f) for f in self.tok_starts[:-1]]
            starts = np.concatenate([f + sh.offsets[:-1].astype(np.int64) for f, sh in zip(firsts, self.shards, strict=True)])
            ends = np.concatenate([f + sh.offsets[1:].astype(np.int64) for f, sh in zip(firsts, self.shards, strict=True)])
            ends = np.minimum(ends, starts + self.context)  # after the row's <|endoftext|>: all targets
        else:
            starts = np.arange(n, dtype=np.int64) * self.context + 1
            ends = starts + self.context
        found = np.zeros(n, dtype=bool)
        # Shard by shard, so only one shard's mask is ever unpacked. Ranges are sorted and disjoint.
        for s, shard in enumerate(self.shards):
            first, last = int(self.tok_starts[s]), int(self.tok_starts[s + 1])
            lo, hi = np.maximum(starts, first) - first, np.minimum(ends, last) - first
            sel = np.flatnonzero(lo < hi)
            if len(sel) == 0:
                continue
            bits = np.append(shard.assistant(0, shard.n_tokens), False)  # [n_tokens + 1]: room for an end index
            bounds = np.empty(2 * len(sel), dtype=np.int64)
            bounds[0::2], bounds[1::2] = lo[sel], hi[sel]
            # reduceat over [lo, hi) pairs; the odd segments are the gaps between ranges.
            found[sel] |= np.logical_or.reduceat(bits, bounds)[0::2]
        return found


class TokenLoader:
    """Batches of one split of a prepared dataset (see the module docstring for the design).

    `loss_on="assistant"` keeps targets only where the target token is an assistant token of a
    ChatML conversation (chat fine-tuning); "all" (the default) keeps every target.
    """

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, context: int, *,
                 mode: str = "packed", seed: int = 0, rank: int = 0, world_size: int = 1,
                 sequential: bool = False, loss_on: str = "all") -> None:
        _check_args(split, batch_size, context, mode, rank, world_size)
        if loss_on not in LOSS_ON:
            raise UserError(f"loss_on {loss_on!r} is unknown: use all or assistant")
        self.data_dir = Path(data_dir)
        self._manifest = load_manifest(self.data_dir)
        self.split, self.batch_size, self.context, self.mode = split, batch_size, context, mode
        self.seed, self.rank, self.world_size, self.sequential = seed, rank, world_size, sequential
        self.loss_on = loss_on
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

    @property
    def epoch_rows(self) -> int:
        """Rows in one pass over every source's units."""
        return sum(s.n_units for s in self._sources)

    # -- evaluation ----------------------------------------------------------------------------
    def eval_rows(self, max_rows: int | None = None) -> dict[str, int]:
        """Rows each source gives an evaluation: all its units, or its share of `max_rows`.

        Shares are in proportion to the sources' sizes (largest remainder), not their training
        weights: the subset is then a small copy of the split, so its token mean estimates the
        whole pass's. A source whose share rounds to 0 rows is left out of the subset.
        """
        sizes = [s.n_units for s in self._sources]
        total = sum(sizes)
        if max_rows is None or max_rows >= total:
            return {s.name: n for s, n in zip(self._sources, sizes, strict=True)}
        rows = [n * max_rows // total for n in sizes]
        # Integer remainders, so no float rounding; only sources with a remainder get the extra
        # rows, and those have fewer rows than units: no source is ever asked for a row twice.
        by_remainder = sorted(range(len(sizes)), key=lambda i: -(sizes[i] * max_rows % total))
        for i in by_remainder[: max_rows - sum(rows)]:
            rows[i] += 1
        return {s.name: n for s, n in zip(self._sources, rows, strict=True)}

    def eval_pass(self, max_rows: int | None = None) -> Iterator[tuple[str, Batch]]:
        """(source name, batch) over each source's first `eval_rows(max_rows)` units, in order.

        Every row comes once and no batch mixes sources (a source's last batch may be short), so
        the pass is exact whatever the sources' sizes and weights, and scores split by source.
        It is the same rows every time and ignores the seed, the weights, the rank and the
        position: callers that share the work among ranks share out the batches.
        """
        for src, n in zip(self._sources, self.eval_rows(max_rows).values(), strict=True):
            for start in range(0, n, self.batch_size):
                rows = [src.unit(k) for k in range(start, min(n, start + self.batch_size))]
                yield src.name, self._collate(rows)

    def _open_sources(self) -> list[_SourceSplit]:
        opened, short = [], []
        for name, entry in self._manifest["sources"].items():
            if entry.get("split", self.split) != self.split:
                continue  # all its documents are in the other split (module docstring)
            src = _SourceSplit(self.data_dir, name, entry["splits"][self.split], self.mode, self.context, self.loss_on)
            (opened if src.n_units > 0 else short).append(src)
        for src in short:
            need = f"{self.context + 1} tokens for one row" if self.mode == "packed" else "one document"
            msg = (f"{self.data_dir}: the {self.split} split of source {src.name} has {src.n_tokens} tokens in "
                   f"{src.n_docs} documents, less than {need}")
            fix = "prepare more data (raise --max-tokens) or use a smaller context"
            if src.n_docs == 0:  # a larger share for val empties train further
                fix = f"prepare it again with more data or a {'smaller' if self.split == 'train' else 'larger'} --val-fraction"
            elif src.masked and src.n_rows > 0:
                within = f" in the first {self.context} tokens of any document" if self.mode == "padded" else ""
                msg = (f"{self.data_dir}: the {self.split} split of source {src.name} has no assistant tokens "
                       f"(chat answers){within} to put the loss on")
                fix = "fine-tune on chat data (alpaca, reddit-instruct, builtin) or train with the loss on all tokens"
                fix += ", or use a longer context" if within else ""
            if self.split == "train" or not opened:
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
        return self._collate(rows)

    def _collate(self, rows: list[tuple[np.ndarray, np.ndarray | None]]) -> Batch:
        tokens = [t for t, _ in rows]
        masks = [m for _, m in rows] if self.loss_on == "assistant" else None
        return _packed(tokens, masks) if self.mode == "packed" else _padded(tokens, masks, self.context)

    # -- position ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "mode": self.mode,
            "context": self.context,
            "seed": self.seed,
            "sequential": self.sequential,
            "loss_on": self.loss_on,
            "rows": self._rows,
            "cursors": {s.name: c for s, c in zip(self._sources, self._cursors, strict=True)},
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise UserError("the saved data-loader position is not one this tinyllm wrote: start the run afresh")
        state = {"loss_on": "all"} | state  # positions saved before loss_on existed
        for key in ("split", "mode", "context", "seed", "sequential", "loss_on"):
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


def _packed(rows: list[np.ndarray], masks: list[np.ndarray] | None) -> Batch:
    w = np.stack(rows).astype(np.int64)  # [B, T + 1]
    targets = w[:, 1:].copy()  # [B, T]
    if masks is not None:
        targets[~np.stack(masks)[:, 1:]] = -1  # the mask of the target token decides
    return Batch(inputs=torch.from_numpy(w[:, :-1].copy()), targets=torch.from_numpy(targets))


def _padded(rows: list[np.ndarray], masks: list[np.ndarray] | None, context: int) -> Batch:
    # The batch's longest row, as (input, target) pairs, rounded up to a multiple of WIDTH_BUCKET
    # (<= context): each new shape costs oneDNN a kernel build under bf16, and torch.compile a recompile.
    width = min(context, -(-(max(len(r) for r in rows) - 1) // WIDTH_BUCKET) * WIDTH_BUCKET)
    inputs = np.full((len(rows), width), PAD, dtype=np.int64)  # [B, width]
    targets = np.full((len(rows), width), -1, dtype=np.int64)  # [B, width]; -1: no loss
    for i, r in enumerate(rows):
        inputs[i, : len(r) - 1] = r[:-1]
        targets[i, : len(r) - 1] = r[1:] if masks is None else np.where(masks[i][1:], r[1:].astype(np.int64), -1)
    return Batch(inputs=torch.from_numpy(inputs), targets=torch.from_numpy(targets))
