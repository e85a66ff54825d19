"""evaluate_loss: the exact token mean over a split, bits per byte of the scored targets, the floor."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinyllm.data.shards import Shard
from tinyllm.errors import UserError
from tinyllm.eval.loss import LossSum, evaluate_loss, score_batches
from tinyllm.model.gpt import GPT, GPTConfig
from tinyllm.tokenizer import EOT, VOCAB_SIZE, get_tokenizer

T = 24


def val_docs(out, manifest) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, assistant mask) of every val document, straight from the shards."""
    docs = []
    for entry in manifest["sources"]["builtin"]["splits"]["val"]["shards"]:
        shard = Shard(out / entry["file"], VOCAB_SIZE, expect=entry)
        for i in range(shard.n_docs):
            lo, hi = int(shard.offsets[i]), int(shard.offsets[i + 1])
            docs.append((shard.tokens[lo:hi].astype(np.int64), shard.assistant(lo, hi)))
    return docs


def by_hand(model, rows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, int, int]:
    """Summed nats, target count and target bytes over (inputs, targets) rows, one row at a time."""
    tok = get_tokenizer()
    nats, count, nbytes = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for x, y in rows:
            logits = model(torch.from_numpy(x)[None])[0]  # [T, V]
            nats += F.cross_entropy(logits, torch.from_numpy(y), ignore_index=-1, reduction="sum").item()
            kept = [int(t) for t in y if t != -1]
            count += len(kept)
            nbytes += sum(len(tok.decode_bytes([t])) for t in kept if t != EOT)
    return nats, count, nbytes


def test_loss_is_the_token_mean_over_the_split(builtin_data, tiny_model):
    out, m = builtin_data
    stream = np.concatenate([t for t, _ in val_docs(out, m)])
    windows = [(stream[k * T : k * T + T], stream[k * T + 1 : k * T + T + 1]) for k in range((len(stream) - 1) // T)]
    nats, count, nbytes = by_hand(tiny_model, windows)
    assert len(windows) % 4  # so the last batch is a short one
    r = evaluate_loss(tiny_model, out, batch_size=4, context=T)
    assert r.tokens == count == len(windows) * T and r.bytes == nbytes
    assert r.loss == pytest.approx(nats / count, rel=1e-5)
    assert r.perplexity == pytest.approx(math.exp(nats / count), rel=1e-5)
    assert r.bits_per_byte == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-5)


def test_padded_assistant_loss_weights_batches_by_their_targets(builtin_data):
    out, m = builtin_data
    # 128 tokens: the fixture's few val stories reach their answers only past 64.
    torch.manual_seed(0)
    model, context = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=128)), 128
    rows = []
    for tokens, mask in val_docs(out, m):  # a padded row: <|endoftext|>, then the document
        tokens, mask = np.concatenate([[EOT], tokens])[: context + 1], np.concatenate([[False], mask])[: context + 1]
        if mask[1:].any():
            rows.append((tokens[:-1], np.where(mask[1:], tokens[1:], -1)))
    assert rows
    nats, count, nbytes = by_hand(model, rows)
    r = evaluate_loss(model, out, batch_size=3, context=context, mode="padded", loss_on="assistant")
    assert r.tokens == count and r.bytes == nbytes
    assert r.loss == pytest.approx(nats / count, rel=1e-5)
    assert r.floor is None and r.gap is None  # the floor is over all tokens, not answers


def test_scored_bytes_add_up_to_the_manifests_bytes(builtin_data):
    out, m = builtin_data
    docs = val_docs(out, m)
    longest = max(len(t) for t, _ in docs)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=longest))  # every document whole
    r = evaluate_loss(model, out, batch_size=8, context=longest, mode="padded")
    # A padded row starts with <|endoftext|>, so each document's every token and byte is a target.
    assert r.bytes == m["splits"]["val"]["bytes"]
    assert r.tokens == m["splits"]["val"]["tokens"]


def test_floor_and_gap_come_from_the_manifest(builtin_data, tiny_model):
    out, m = builtin_data
    r = evaluate_loss(tiny_model, out, batch_size=4, context=T, max_batches=2)
    assert r.tokens == 2 * 4 * T
    assert r.floor == m["floor"] and r.gap == pytest.approx(r.loss - m["floor"])
    assert evaluate_loss(tiny_model, out, split="train", batch_size=4, context=T, max_batches=1).floor is None


def test_batches_without_targets_add_nothing_and_the_mode_is_restored(tiny_model):
    x = torch.randint(0, 1000, (2, 8))
    y = torch.randint(0, 1000, (2, 8))
    y[1, 3:] = -1
    tiny_model.train()
    alone = score_batches(tiny_model, [(x, y)])
    with_empty = score_batches(tiny_model, [(x, torch.full_like(y, -1)), (x, y)])
    assert with_empty == alone and alone.tokens == 11 and tiny_model.training
    with pytest.raises(UserError, match="no targets"):
        _ = LossSum().mean


def test_bits_per_byte_formula():
    s = LossSum(nats=2 * math.log(2) * 300, tokens=100, bytes=300)
    r = s.result(floor=1.5)
    assert r.bits_per_byte == pytest.approx(2.0) and r.loss == pytest.approx(6 * math.log(2))
    assert r.gap == pytest.approx(r.loss - 1.5)
    assert LossSum(nats=5.0, tokens=2, bytes=0).result().bits_per_byte is None
    assert LossSum(nats=2000.0, tokens=1).result().perplexity == math.inf


def test_bad_max_batches_is_a_user_error(builtin_data, tiny_model):
    with pytest.raises(UserError, match="max_batches"):
        evaluate_loss(tiny_model, builtin_data[0], batch_size=2, context=T, max_batches=0)


def source_val_docs(out, manifest, name) -> list[np.ndarray]:
    docs = []
    for entry in manifest["sources"][name]["splits"]["val"]["shards"]:
        shard = Shard(out / entry["file"], VOCAB_SIZE, expect=entry)
        docs += [shard.document(i).astype(np.int64) for i in range(shard.n_docs)]
    return docs


def test_a_mix_is_scored_row_by_row_once_per_source_and_totalled_by_tokens(tmp_path, tiny_model):
    """Sizes and weights far apart: a pass drawn by weight would score the small source's rows
    many times over and never reach most of the big one's."""
    from tinyllm.data.prepare import PrepareOptions, prepare
    from tinyllm.data.source_specs import resolve_sources

    words = "the cat sat on a mat and ran to see a red dog under old trees".split()
    for name, n in (("small", 12), ("big", 160)):
        lines = [json.dumps({"text": f"{i}. " + " ".join(words[(i + k) % len(words)] for k in range(6 + i % 9))})
                 for i in range(n)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    sources = resolve_sources([f"{tmp_path / 'small.jsonl'}:3", f"{tmp_path / 'big.jsonl'}:1"])
    out = tmp_path / "ds"
    m = prepare(sources, out, PrepareOptions(val_fraction=0.5, progress=False))
    r = evaluate_loss(tiny_model, out, batch_size=4, context=T)
    by_source = {}
    for name in ("local-small", "local-big"):  # each source's rows: the windows of its own stream
        stream = np.concatenate(source_val_docs(out, m, name))
        windows = [(stream[k * T : k * T + T], stream[k * T + 1 : k * T + T + 1]) for k in range((len(stream) - 1) // T)]
        by_source[name] = LossSum(*by_hand(tiny_model, windows))
    total = sum(by_source.values(), LossSum())
    assert 5 * by_source["local-small"].tokens < by_source["local-big"].tokens
    assert r.tokens == total.tokens and r.bytes == total.bytes
    assert r.loss == pytest.approx(total.mean, rel=1e-5)  # by tokens, not by the 3:1 weights
    for name, want in by_source.items():
        s = r.sources[name]
        assert s.tokens == want.tokens and s.bytes == want.bytes and s.loss == pytest.approx(want.mean, rel=1e-5)
