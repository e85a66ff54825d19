"""The shard file: what is written is read back exactly, and damage is named, never loaded."""

from __future__ import annotations

import numpy as np
import pytest

from tinyllm.data.shards import HEADER, MAGIC, Shard, ShardWriter, shard_size
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
    n_tokens = sum(map(len, DOCS))
    at = shard_size(n_tokens, len(DOCS)) - (n_tokens + 7) // 8 - 16  # the second-to-last offset
    raw[at : at + 8] = (3).to_bytes(8, "little")  # no longer ends on <|endoftext|>
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"s\.bin.*(offsets|endoftext)"):
        Shard(path, VOCAB_SIZE)


def test_other_vocabulary_is_refused(tmp_path):
    path = tmp_path / "s.bin"
    write(path)
    with pytest.raises(UserError, match="vocabulary of 50260"):
        Shard(path, 50257)


MASKS = [[0, 1, 1, 0], [1, 0], [0, 0], [0, 0, 1, 1, 1, 0]]


def test_assistant_mask_reads_back_for_any_range(tmp_path):
    path = tmp_path / "s.bin"
    w = ShardWriter(path, VOCAB_SIZE)
    w.add(DOCS[:1], MASKS[:1])
    w.add(DOCS[1:], MASKS[1:])
    info = w.close().to_json()
    shard = Shard(path, VOCAB_SIZE, expect=info)
    flat = [m for mask in MASKS for m in mask]
    assert shard.has_mask and path.stat().st_size == shard_size(len(flat), 4)
    for lo in range(len(flat)):  # every range, so ranges that start and end inside a byte too
        for hi in range(lo, len(flat) + 1):
            assert shard.assistant(lo, hi).tolist() == [bool(m) for m in flat[lo:hi]]


def test_documents_without_masks_have_no_assistant_tokens(tmp_path):
    info = write(tmp_path / "s.bin")
    shard = Shard(tmp_path / "s.bin", VOCAB_SIZE, expect=info)
    assert not shard.assistant(0, shard.n_tokens).any()


def test_a_mask_of_the_wrong_length_is_refused(tmp_path):
    w = ShardWriter(tmp_path / "s.bin", VOCAB_SIZE)
    with pytest.raises(ValueError, match="mask of its own length"):
        w.add(DOCS[:2], [[0, 1, 1, 0], [1]])
    w.abort()


def as_version_1(path):
    """Rewrite a shard as version 1 wrote it: the same tokens and offsets, no mask."""
    raw = path.read_bytes()
    _, _, vocab, n_tokens, n_docs = HEADER.unpack(raw[: HEADER.size])
    body = raw[HEADER.size : shard_size(n_tokens, n_docs, version=1)]
    path.write_bytes(HEADER.pack(MAGIC, 1, vocab, n_tokens, n_docs) + body)


def test_version_1_shards_still_load_without_a_mask(tmp_path):
    path = tmp_path / "s.bin"
    write(path, batches=1)
    as_version_1(path)
    shard = Shard(path, VOCAB_SIZE)
    assert [shard.document(i).tolist() for i in range(shard.n_docs)] == DOCS
    assert not shard.has_mask
    with pytest.raises(ValueError, match="no assistant mask"):
        shard.assistant(0, 1)


def test_unknown_version_is_named(tmp_path):
    path = tmp_path / "s.bin"
    write(path)
    raw = bytearray(path.read_bytes())
    raw[8:12] = (7).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"s\.bin.*format version 7, this tinyllm reads versions 1 and 2"):
        Shard(path, VOCAB_SIZE)
