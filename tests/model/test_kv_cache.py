"""Decoding with the KV cache gives the logits of a full forward pass, piece by piece."""

from __future__ import annotations

import pytest
import torch

from tinyllm.model import GPT, GPTConfig, KVCache
from tinyllm.model.kv_cache import BatchKVCache
from tinyllm.tokenizer import EOT

TINY = dict(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32)


@pytest.mark.parametrize("options", [{}, dict(pos_emb="rope"), dict(qk_norm=True, norm="rmsnorm")])
@pytest.mark.parametrize("pieces", [[16], [5, 1, 1, 9], [3, 4, 9], [1] * 16])
def test_cached_pieces_give_the_full_forward_logits(options, pieces):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, **options)).eval()
    idx = torch.randint(0, 256, (2, 16))
    full = model(idx)  # [2, 16, 256]
    cache = model.make_kv_cache(batch_size=2)
    outs, start = [], 0
    for n in pieces:
        outs.append(model(idx[:, start : start + n], kv_cache=cache))
        start += n
    assert cache.length == 16
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_doc_mask_decodes_a_prompt_as_its_full_forward(pos_emb):
    """A prompt is one document (it starts with <|endoftext|>), so the cache, which builds no
    document mask, gives what the masked full forward gives."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=EOT + 4, block_size=16, n_layer=2, n_head=2, n_embd=32,
                    pos_emb=pos_emb, doc_mask=True)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 1000, (1, 16))
    idx[0, 0] = EOT
    cache = model.make_kv_cache(batch_size=1)
    outs = [model(idx[:, :6], kv_cache=cache)] + [model(idx[:, i : i + 1], kv_cache=cache) for i in range(6, 16)]
    torch.testing.assert_close(torch.cat(outs, dim=1), model(idx), atol=1e-5, rtol=1e-5)


def test_overflowing_the_cache_or_the_context_raises():
    model = GPT(GPTConfig(**TINY)).eval()
    cache = model.make_kv_cache(max_len=8)
    model(torch.zeros(1, 8, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="overflow"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)
    assert cache.length == 8  # a failed call leaves the cache as it was
    cache = model.make_kv_cache()
    model(torch.zeros(1, 16, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)


def test_cache_batch_must_match_the_input():
    model = GPT(GPTConfig(**TINY)).eval()
    with pytest.raises(ValueError, match="batch"):
        model(torch.zeros(3, 4, dtype=torch.long), kv_cache=model.make_kv_cache(batch_size=1))


def test_reset_lets_the_cache_be_reused():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    cache = model.make_kv_cache()
    a, b = torch.randint(0, 256, (1, 6)), torch.randint(0, 256, (1, 6))
    model(a, kv_cache=cache)
    cache.reset()
    torch.testing.assert_close(model(b, kv_cache=cache), model(b))


def test_update_returns_all_positions_so_far():
    cache = KVCache(n_layer=1, batch=1, n_head=1, max_len=4, head_dim=2)
    k1, v1 = torch.ones(1, 1, 3, 2), torch.full((1, 1, 3, 2), 2.0)
    k, v = cache.update(0, k1, v1)
    assert k.shape == (1, 1, 3, 2) and torch.equal(v, v1)
    cache.advance(3)
    k, _ = cache.update(0, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
    assert k.shape == (1, 1, 4, 2) and torch.equal(k[:, :, :3], k1)


def test_cached_decoding_works_under_bf16_autocast():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, pos_emb="rope", qk_norm=True)).eval()
    idx = torch.randint(0, 256, (1, 10))
    cache = model.make_kv_cache()  # fp32 cache; autocast's bf16 k/v are stored in it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(idx)
        steps = [model(idx[:, :6], kv_cache=cache)] + [
            model(idx[:, i : i + 1], kv_cache=cache) for i in range(6, 10)
        ]
    assert full.dtype == torch.float32
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("options", [{}, dict(pos_emb="rope"), dict(qk_norm=True, norm="rmsnorm")])
def test_batch_cache_rows_of_different_lengths_each_decode_as_alone(options):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, **options)).eval()
    seqs = [torch.randint(0, 256, (1, n)) for n in (3, 9, 5)]
    batch = None
    for seq in seqs:  # each row joins with all but its last token prefilled alone
        one = model.make_kv_cache()
        model(seq[:, :-1], kv_cache=one)
        batch = batch or BatchKVCache(like=one)
        batch.put(batch.batch, one)
    assert batch.lengths == [2, 8, 4] and batch.length == 8
    last = torch.cat([seq[:, -1:] for seq in seqs])  # [3, 1]
    got = model(last, kv_cache=batch)  # [3, 1, V]: each row at its own position
    for row, seq in enumerate(seqs):
        torch.testing.assert_close(got[row], model(seq)[0, -1:], atol=1e-5, rtol=1e-5)
    assert batch.lengths == [3, 9, 5]
    batch.remove(0)  # the last row moves into the gap, its keys with it
    assert batch.lengths == [5, 9]
    nxt = torch.randint(0, 256, (2, 1))
    got = model(nxt, kv_cache=batch)
    for row, seq in enumerate([seqs[2], seqs[1]]):
        full = model(torch.cat([seq, nxt[row : row + 1]], dim=1))
        torch.testing.assert_close(got[row], full[0, -1:], atol=1e-5, rtol=1e-5)


def test_batch_cache_takes_one_token_per_row():
    model = GPT(GPTConfig(**TINY)).eval()
    one = model.make_kv_cache()
    model(torch.zeros(1, 4, dtype=torch.long), kv_cache=one)
    batch = BatchKVCache(like=one)
    batch.put(0, one)
    with pytest.raises(ValueError, match="one new token per row"):
        model(torch.zeros(1, 2, dtype=torch.long), kv_cache=batch)
