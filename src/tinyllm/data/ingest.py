"""Ingesting one source: documents -> parallel tokenization -> train/val -> shards, resumably.

Why it is shaped this way:
- The source is read in chunks of documents (a few MB of text), one chunk ahead: the next chunk
  is read (Python, holding the GIL) while encoder threads tokenize the current one (tiktoken
  releases the GIL), so reading and tokenizing overlap and nothing has to fit in memory.
- Each document goes to its shard with its assistant mask (`document_tokens`), and each split
  counts the UTF-8 bytes of its documents' rendered text, the denominator of bits per byte.
- Train/val is decided per document by a hash of its text, so re-running gives the same split
  and a document never lands in both. Until a source has `MIN_VAL_DOCS` val documents the bar is
  25%, so even a tiny run can be validated. A source with a fixed split (`--val-source` given)
  sends every document there instead: the user chose the held-out set.
- Commit points make it resumable: when a train or val shard fills, both open shards of the
  source are finished (renamed into place) and the caller saves the state, which records how many
  records were consumed. A restart re-reads at most one shard's worth of records.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from tinyllm.console import interactive
from tinyllm.data.document import Document, document_tokens
from tinyllm.data.manifest import SPLITS
from tinyllm.data.prepare_options import PrepareOptions
from tinyllm.data.shards import ShardWriter
from tinyllm.data.sources import Source
from tinyllm.errors import UserError
from tinyllm.tokenizer import Tokenizer

MIN_VAL_DOCS = 8
EARLY_VAL_FRACTION = 0.25
CHUNK_CHARS = 4 << 20  # text per chunk: enough to keep every encoder thread busy
CHUNK_DOCS = 8192


def new_state() -> dict:
    """A source's ingest state before its first record; saved at every commit point."""

    def split() -> dict:
        # bytes: UTF-8 bytes of Document.rendered(), for bits per byte;
        # nll: -sum(logprob) over scored documents (builtin), for the entropy floor
        return {"documents": 0, "tokens": 0, "bytes": 0, "shards": [], "nll": 0.0, "scored_documents": 0}

    return {
        "position": 0,  # records of the source consumed up to the last commit
        "done": False,
        "documents": 0,
        "tokens": 0,
        "skipped_empty": 0,
        "replaced_utf8": 0,
        "splits": {s: split() for s in SPLITS},
    }


def is_empty(doc: Document) -> bool:
    # A malformed message counts as content: tokenizing it reports the mistake with its record.
    return not doc.text.strip() and not any(
        not isinstance(m, dict) or str(m.get("content", "")).strip() for m in doc.messages or ()
    )


def rendered_bytes(doc: Document) -> bytes:
    """The document's rendered text as UTF-8 (lone surrogates from JSON kept, not refused)."""
    return doc.rendered().encode("utf-8", "surrogatepass")


def val_hash(rendered: bytes) -> float:
    """A document's place in [0, 1) from its `rendered_bytes`: below the val bar it goes to val."""
    digest = hashlib.blake2b(rendered, digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


class _Encoded:
    def __init__(self, futures: list[Future]) -> None:
        self._futures = futures

    def result(self) -> list[list[int]]:
        return [ids for f in self._futures for ids in f.result()]


class _Encoder:
    """Encodes a chunk's texts on `threads` threads, one contiguous slice per thread.

    `Tokenizer.encode_batch` hands the pool one text at a time; for short documents (the
    builtin corpus averages ~80 tokens) that task overhead cost more than the BPE itself: one
    slice per thread encoded the builtin corpus 2.7x as fast (README, "The tokenizer").
    """

    def __init__(self, tok: Tokenizer, threads: int) -> None:
        self._encode, self._threads = tok.encode, threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="tinyllm-encode")

    def _encode_all(self, texts: list[str]) -> list[list[int]]:
        return [self._encode(t) for t in texts]

    def submit(self, texts: list[str]) -> _Encoded:
        step = max(1, -(-len(texts) // self._threads))
        return _Encoded([self._pool.submit(self._encode_all, texts[i : i + step]) for i in range(0, len(texts), step)])

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


class SourceIngest:
    """Streams one source into its shards from its last commit point."""

    def __init__(self, src: Source, state: dict, cap: dict, out: Path, tok: Tokenizer, options: PrepareOptions,
                 save: Callable[[], None]) -> None:
        self.src, self.state, self.out, self.tok, self.options, self.save = src, state, out, tok, options, save
        self.max_docs, self.max_tokens = cap["max_docs"], cap["max_tokens"]
        self.fixed_split: str | None = cap.get("split")  # absent: split by hash
        self.writers: dict[str, ShardWriter] = {}
        self.pending: dict[str, list[list[int]]] = {s: [] for s in SPLITS}
        self.pending_masks: dict[str, list[list[int]]] = {s: [] for s in SPLITS}
        self.open_tokens = dict.fromkeys(SPLITS, 0)  # tokens in each split's unfinished shard

    def run(self) -> None:
        st = self.state
        bar = tqdm(total=self.max_tokens, initial=st["tokens"], unit="tok", unit_scale=True,
                   desc=f"prepare {self.src.name}", disable=not (self.options.progress and interactive()),
                   dynamic_ncols=True)
        docs = self.src.documents(st["position"])
        encoder = _Encoder(self.tok, self.options.threads or os.cpu_count() or 1)
        try:
            # One chunk ahead: the next chunk is read (Python, holding the GIL) while the
            # encoder threads tokenize the current one (tiktoken releases the GIL).
            chunk, flags = self._pull(docs)
            ids = encoder.submit([d.text for d in chunk])
            while chunk:
                nxt, nxt_flags = self._pull(docs)
                nxt_ids = encoder.submit([d.text for d in nxt])
                before = st["tokens"]
                finished = self._add_chunk(chunk, ids.result(), flags)
                self._flush()
                bar.set_postfix(docs=f"{st['documents']:,}", refresh=False)
                bar.update(st["tokens"] - before)
                if finished:
                    break
                chunk, flags, ids = nxt, nxt_flags, nxt_ids
            if st["documents"] == 0:
                raise UserError(f"{self.src.flag} {self.src.spec} gave no documents ({st['skipped_empty']} empty ones "
                                "skipped): check its path and --field")
            self._commit(done=True)
        except BaseException:
            for w in self.writers.values():
                w.abort()
            raise
        finally:
            encoder.close()
            bar.close()

    def _pull(self, docs) -> tuple[list[Document], list[bool]]:
        """The next chunk of documents, each flagged if the reader had to replace invalid UTF-8."""
        chunk, flags, chars = [], [], 0
        counters = self.src.counters
        seen = counters.replaced_utf8
        for doc in itertools.islice(docs, CHUNK_DOCS):
            chunk.append(doc)
            flags.append(counters.replaced_utf8 != seen)
            seen = counters.replaced_utf8
            chars += len(doc.text)
            if chars >= CHUNK_CHARS:
                break
        return chunk, flags

    def _add_chunk(self, chunk: list[Document], text_ids: list[list[int]], flags: list[bool]) -> bool:
        """Route and append a chunk's documents; True once the source's cap is reached."""
        st = self.state
        for doc, ids, replaced in zip(chunk, text_ids, flags, strict=True):
            st["position"] += 1
            st["replaced_utf8"] += replaced
            if is_empty(doc):
                st["skipped_empty"] += 1
                continue
            try:
                ids, mask = document_tokens(self.tok, doc, ids)
            except UserError as e:
                where = doc.where or f"{self.src.flag} {self.src.spec}, record {st['position'] - 1}"
                raise UserError(f"{where}: {e}") from None
            rendered = rendered_bytes(doc)
            split = self._split_of(rendered)
            self._append(split, ids, mask, len(rendered), doc.logprob)
            if (self.max_docs and st["documents"] >= self.max_docs) or (self.max_tokens and st["tokens"] >= self.max_tokens):
                return True
            if self.open_tokens[split] >= self.options.shard_tokens:
                self._commit(done=False)
        return False

    def _split_of(self, rendered: bytes) -> str:
        if self.fixed_split is not None:
            return self.fixed_split
        frac = self.options.val_fraction
        if frac <= 0:
            return "train"
        if self.state["splits"]["val"]["documents"] < MIN_VAL_DOCS:
            frac = max(frac, EARLY_VAL_FRACTION)
        return "val" if val_hash(rendered) < frac else "train"

    def _append(self, split: str, ids: list[int], mask: list[int], n_bytes: int, logprob: float | None) -> None:
        st, sp = self.state, self.state["splits"][split]
        self.pending[split].append(ids)
        self.pending_masks[split].append(mask)
        self.open_tokens[split] += len(ids)
        sp["bytes"] += n_bytes
        for d in (st, sp):
            d["documents"] += 1
            d["tokens"] += len(ids)
        if logprob is not None:
            sp["nll"] -= logprob
            sp["scored_documents"] += 1

    def _flush(self) -> None:
        for split, docs in self.pending.items():
            if docs:
                if split not in self.writers:
                    n = len(self.state["splits"][split]["shards"])
                    path = self.out / f"{self.src.name}-{split}-{n:05d}.bin"
                    self.writers[split] = ShardWriter(path, self.tok.vocab_size)
                self.writers[split].add(docs, self.pending_masks[split])
                self.pending[split], self.pending_masks[split] = [], []

    def _commit(self, done: bool) -> None:
        """Finish every open shard of this source and record the stream position."""
        self._flush()
        for split, writer in self.writers.items():
            self.state["splits"][split]["shards"].append(writer.close().to_json())
            self.open_tokens[split] = 0
        self.writers.clear()
        self.state["done"] = done
        self.save()
