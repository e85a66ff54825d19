"""Token shard files: the on-disk format `prepare` writes and the loader memory-maps.

Why it is shaped this way:
- One file holds whole documents: a 32-byte header, the tokens as uint16 (GPT-2 + ChatML is
  50,260 ids, under 65,536), then the document offsets as uint64. Documents never straddle
  files, so padded (one document per row) batches need no cross-file stitching, and a shard is a
  unit of resume: it is either finished and renamed into place, or it does not exist.
- The header carries magic, version, vocabulary size and the token and document counts, so a
  truncated or foreign file is caught from its size alone; the manifest also records each shard's
  CRC-32, checked on open, so flipped bytes are caught too (CRC-32 runs at several GB/s here, far
  faster than a loader needs the data).
- Tokens are written as they come (the file grows while the source streams) and the offsets,
  mask and header go in last, before the temp file is renamed; a shard in memory is never larger
  than one tokenization chunk plus its mask (n/8 bytes packed; n bytes unpacked while open).
- Version 2 adds the assistant mask: one bit per token, set where the chat template marks the
  token as written by the assistant (`ChatRendering.mask`). Chat fine-tuning puts its loss only
  there. One bit keeps the file 6% larger, not 50% as a uint8 per token would, and it lives at
  the end so the tokens and offsets sit where version 1 put them: version 1 shards still load,
  they just have no mask (`has_mask` False), and the loader says to re-run prepare when one is
  asked for.

Layout (little-endian):
    0   magic   8 bytes  b"TLLMTOK\\0"
    8   version uint32   1 or 2
    12  vocab   uint32
    16  tokens  uint64   n
    24  docs    uint64   d
    32  tokens  uint16[n]
    ..  zero padding to a multiple of 8
    ..  offsets uint64[d + 1]   offsets[0] = 0, offsets[d] = n; document i is tokens[off[i]:off[i+1]]
    ..  mask    uint8[ceil(n / 8)]  (version 2) bit k of byte j (LSB first) is token 8j + k
"""

from __future__ import annotations

import itertools
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinyllm.errors import UserError
from tinyllm.tokenizer import EOT

MAGIC = b"TLLMTOK\0"
VERSION = 2
READABLE_VERSIONS = (1, 2)
HEADER = struct.Struct("<8sIIQQ")  # magic, version, vocab size, token count, document count
TOKEN_DTYPE = np.uint16


def _offsets_start(n_tokens: int) -> int:
    end = HEADER.size + 2 * n_tokens
    return (end + 7) // 8 * 8


def _mask_start(n_tokens: int, n_docs: int) -> int:
    return _offsets_start(n_tokens) + 8 * (n_docs + 1)


def shard_size(n_tokens: int, n_docs: int, version: int = VERSION) -> int:
    """The exact byte size of a shard holding `n_tokens` tokens in `n_docs` documents."""
    mask = (n_tokens + 7) // 8 if version >= 2 else 0
    return _mask_start(n_tokens, n_docs) + mask


@dataclass(frozen=True)
class ShardInfo:
    """What the manifest records about one finished shard."""

    file: str
    tokens: int
    documents: int
    bytes: int
    crc32: int

    def to_json(self) -> dict:
        return {"file": self.file, "tokens": self.tokens, "documents": self.documents, "bytes": self.bytes, "crc32": self.crc32}


class ShardWriter:
    """Appends whole documents to `path` (through a temp name) and finishes it atomically."""

    def __init__(self, path: Path, vocab_size: int) -> None:
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._vocab_size = vocab_size
        self._f = open(self._tmp, "wb")
        self._f.write(b"\0" * HEADER.size)  # filled in by close(), once the counts are known
        self._offsets = [0]
        self._masks: list[np.ndarray] = []  # uint8 per token, packed to bits on close
        self._crc = 0
        self.n_tokens = 0

    @property
    def n_docs(self) -> int:
        return len(self._offsets) - 1

    def add(self, docs: Sequence[Sequence[int]], masks: Sequence[Sequence[int]] | None = None) -> None:
        """Append documents (each a sequence of ids, already ending with <|endoftext|>).

        `masks[i][j]` is 1 where token j of document i is an assistant token; no masks means none is.
        """
        if not docs:
            return
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        total = int(lengths.sum())
        flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=TOKEN_DTYPE, count=total)
        mask = np.zeros(total, dtype=np.uint8)
        if masks is not None:
            if [len(m) for m in masks] != lengths.tolist():
                raise ValueError("every document needs a mask of its own length")
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
            for start, m in zip(starts, masks, strict=True):
                if 1 in m:  # most documents have no chat: skip copying their zeros token by token
                    mask[start : start + len(m)] = m
        self._masks.append(mask)
        data = memoryview(flat).cast("B")
        self._f.write(data)
        self._crc = zlib.crc32(data, self._crc)
        ends = self.n_tokens + np.cumsum(lengths)
        self._offsets.extend(ends.tolist())
        self.n_tokens += total

    def close(self) -> ShardInfo:
        """Write offsets and header, fsync, rename into place; returns the manifest entry."""
        pad = _offsets_start(self.n_tokens) - HEADER.size - 2 * self.n_tokens
        bits = np.packbits(np.concatenate(self._masks) if self._masks else np.zeros(0, np.uint8), bitorder="little")
        tail = b"\0" * pad + np.asarray(self._offsets, dtype="<u8").tobytes() + bits.tobytes()
        self._f.write(tail)
        crc = zlib.crc32(tail, self._crc)
        self._f.seek(0)
        self._f.write(HEADER.pack(MAGIC, VERSION, self._vocab_size, self.n_tokens, self.n_docs))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)
        return ShardInfo(self.path.name, self.n_tokens, self.n_docs, shard_size(self.n_tokens, self.n_docs), crc)

    def abort(self) -> None:
        """Drop the unfinished shard (an interrupted run leaves no half-written file behind)."""
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)


class Shard:
    """A finished shard, memory-mapped read-only and checked on open."""

    def __init__(self, path: Path, vocab_size: int, expect: dict | None = None) -> None:
        self.path = Path(path)
        n_tokens, n_docs, version = _read_header(self.path, vocab_size)
        self.n_tokens, self.n_docs = n_tokens, n_docs
        self.has_mask = version >= 2
        if expect is not None:
            _check_against_manifest(self.path, n_tokens, n_docs, expect)
        # An empty np.memmap is not allowed; a shard with no documents is never written.
        self.tokens = np.memmap(self.path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER.size, shape=(n_tokens,))
        self.offsets = np.memmap(self.path, dtype="<u8", mode="r", offset=_offsets_start(n_tokens), shape=(n_docs + 1,))
        self._mask_bits = None
        if self.has_mask:
            start = _mask_start(n_tokens, n_docs)
            self._mask_bits = np.memmap(self.path, dtype=np.uint8, mode="r", offset=start, shape=((n_tokens + 7) // 8,))
        _check_offsets(self)

    def document(self, i: int) -> np.ndarray:
        """Tokens of document i (a view into the map, ending with <|endoftext|>)."""
        return self.tokens[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def assistant(self, lo: int, hi: int) -> np.ndarray:
        """The assistant mask (bool) of tokens lo..hi-1; only for shards that have one."""
        if self._mask_bits is None:
            raise ValueError(f"{self.path} is a version 1 shard: it has no assistant mask")
        bits = np.unpackbits(self._mask_bits[lo // 8 : (hi + 7) // 8], bitorder="little")
        return bits[lo % 8 : lo % 8 + hi - lo].astype(bool)


def _corrupt(path: Path, why: str) -> UserError:
    return UserError(f"shard {path} is corrupt ({why}): delete the dataset directory and run tinyllm prepare again")


def _read_header(path: Path, vocab_size: int) -> tuple[int, int, int]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER.size)
    except FileNotFoundError:
        raise UserError(f"shard {path} is missing: delete the dataset directory and run tinyllm prepare again") from None
    if len(raw) < HEADER.size:
        raise _corrupt(path, f"truncated: {size} bytes, shorter than the {HEADER.size}-byte header")
    magic, version, vocab, n_tokens, n_docs = HEADER.unpack(raw)
    if magic != MAGIC:
        raise _corrupt(path, "not a tinyllm token shard: bad magic bytes")
    if version not in READABLE_VERSIONS:
        readable = " and ".join(map(str, READABLE_VERSIONS))
        raise _corrupt(path, f"format version {version}, this tinyllm reads versions {readable}")
    if vocab != vocab_size:
        raise UserError(f"shard {path} holds ids for a vocabulary of {vocab}, not {vocab_size}: prepare the data again with this tokenizer")
    if n_docs == 0 or n_tokens < n_docs:
        raise _corrupt(path, f"header says {n_tokens} tokens in {n_docs} documents")
    expected = shard_size(n_tokens, n_docs, version)
    if size != expected:
        kind = "truncated" if size < expected else "has trailing bytes"
        raise _corrupt(path, f"{kind}: {size} bytes, header implies {expected}")
    return n_tokens, n_docs, version


def _check_against_manifest(path: Path, n_tokens: int, n_docs: int, expect: dict) -> None:
    if (n_tokens, n_docs) != (expect["tokens"], expect["documents"]):
        raise _corrupt(path, f"{n_tokens} tokens in {n_docs} documents, the manifest says {expect['tokens']} in {expect['documents']}")
    with open(path, "rb") as f:
        f.seek(HEADER.size)
        crc = 0
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    if crc != expect["crc32"]:
        raise _corrupt(path, "its CRC-32 does not match the manifest")


def _check_offsets(shard: Shard) -> None:
    off = shard.offsets
    if off[0] != 0 or off[-1] != shard.n_tokens or np.any(np.diff(off.astype(np.int64)) <= 0):
        raise _corrupt(shard.path, "document offsets are not increasing from 0 to the token count")
    if np.any(shard.tokens[(off[1:] - 1).astype(np.int64)] != EOT):
        raise _corrupt(shard.path, "a document does not end with <|endoftext|>")
