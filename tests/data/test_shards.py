"""The shard file: what is written is read back exactly, and damage is named, never loaded."""

from __future__ import annotations

import numpy as np
import pytest

from tinyllm.data.shards import HEADER, Shard, ShardWriter, shard_size
from tinyllm.errors import UserError
from tinyllm.tokenizer import EOT, VOCAB_SIZE

DOCS = [[10, 11, 12, EOT], [50255, EOT], [7, EOT], [65, 66, 67, 68, 69, EOT]]


def write(path, docs=DOCS, batches=2):
    w = ShardWriter(path, VOCAB_SIZE)
    for i in range(batches):  # documents arrive in several calls, as prepare flushes chunks
        w.add(docs[i::batches])
    return w.close().to_json()


def test_documents_read_back_exactly(tmp_path):
    path = tmp_path / "s.bin"
    w = ShardWriter(path, VOCAB_SIZE)
    w.add(DOCS[:3])
    w.add(DOCS[3:])
    info = w.close().to_json()
    shard = Shard(path, VOCAB_SIZE, expect=info)
    assert [shard.document(i).tolist() for i in range(shard.n_docs)] == DOCS
    assert info["tokens"] == sum(map(len, DOCS)) and info["documents"] == 4
    assert path.stat().st_size == info["bytes"] == shard_size(info["tokens"], 4)
    assert shard.tokens.dtype == np.uint16


def test_unfinished_shard_leaves_no_file(tmp_path):
    w = ShardWriter(tmp_path / "s.bin", VOCAB_SIZE)
    w.add(DOCS)
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_truncated_shard_is_named(tmp_path):
    path = tmp_path / "s.bin"
    info = write(path)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(UserError, match=r"s\.bin.*truncated"):
        Shard(path, VOCAB_SIZE, expect=info)


def test_foreign_file_is_named(tmp_path):
    path = tmp_path / "s.bin"
    path.write_bytes(b"hello, this is not a shard at all" * 3)
    with pytest.raises(UserError, match=r"s\.bin.*magic"):
        Shard(path, VOCAB_SIZE)


def test_flipped_token_fails_the_checksum(tmp_path):
    path = tmp_path / "s.bin"
    info = write(path)
    raw = bytearray(path.read_bytes())
    raw[HEADER.size] ^= 0x01  # first token 10 -> 11: structurally valid, wrong content
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"s\.bin.*CRC"):
        Shard(path, VOCAB_SIZE, expect=info)


def test_broken_offsets_are_caught_without_a_manifest(tmp_path):
    path = tmp_path / "s.bin"
    write(path)
    raw = bytearray(path.read_bytes())
    raw[-16:-8] = (3).to_bytes(8, "little")  # second-to-last offset no longer ends on <|endoftext|>
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"s\.bin.*(offsets|endoftext)"):
        Shard(path, VOCAB_SIZE)


def test_other_vocabulary_is_refused(tmp_path):
    path = tmp_path / "s.bin"
    write(path)
    with pytest.raises(UserError, match="vocabulary of 50260"):
        Shard(path, 50257)
