"""The GPT model: config validation, shapes, causality, every option trains, init and counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tinyllm.model import GPT, GPTConfig
from tinyllm.tokenizer import EOT

TINY = dict(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32)

# Each option on its own (plus the default), as the tracker asks.
OPTIONS = {
    "default": {},
    "rope": dict(pos_emb="rope"),
    "rmsnorm": dict(norm="rmsnorm"),
    "qk_norm": dict(qk_norm=True),
    "swiglu": dict(mlp="swiglu"),
    "relu2": dict(mlp="relu2"),
    "no_bias": dict(bias=False),
    "untied": dict(tie_embeddings=False),
    "dropout": dict(dropout=0.1),
}


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **overrides}))


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (dict(n_embd=30, n_head=4), "divisible"),
        (dict(pos_emb="alibi"), "pos_emb"),
        (dict(norm="batchnorm"), "norm"),
        (dict(mlp="geglu"), "mlp"),
        (dict(n_layer=0), "n_layer"),
        (dict(block_size=-4), "block_size"),
        (dict(dropout=1.0), "dropout"),
        (dict(n_embd=6, n_head=2, pos_emb="rope"), "even"),
        (dict(rope_theta=0.0), "rope_theta"),
    ],
)
def test_config_rejects_bad_values_with_a_clear_message(overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        GPTConfig(**{**TINY, **overrides})


def test_vocab_is_padded_to_a_multiple_of_64():
    assert GPTConfig().padded_vocab_size == 50304
    assert GPTConfig(vocab_size=256).padded_vocab_size == 256
    assert GPTConfig(vocab_size=257, pad_vocab_to=64).padded_vocab_size == 320


def test_logits_cover_only_the_real_vocabulary_in_fp32():
    model = tiny(vocab_size=250)  # padded to 256
    assert model.wte.weight.shape[0] == 256
    idx = torch.randint(0, 250, (3, 10))
    logits = model(idx)
    assert logits.shape == (3, 10, 250) and logits.dtype == torch.float32
    last = model(idx, last_only=True)
    assert last.shape == (3, 1, 250)
    torch.testing.assert_close(last[:, 0], logits[:, -1])


def test_sequence_longer_than_context_raises():
    model = tiny()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_token_ids_outside_the_vocabulary_raise():
    model = tiny(vocab_size=250)
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[1, 2, 252]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, 2, 3]]), targets=torch.tensor([[2, 3, 251]]))


@pytest.mark.parametrize("name", ["default", "rope", "qk_norm", "swiglu"])
def test_attention_is_causal(name):
    model = tiny(**OPTIONS[name]).eval()
    a = torch.randint(0, 256, (1, 12))
    b = a.clone()
    b[0, 8:] = (b[0, 8:] + 1) % 256  # change only the future
    la, lb = model(a), model(b)
    torch.testing.assert_close(la[:, :8], lb[:, :8])
    assert not torch.allclose(la[:, 8:], lb[:, 8:])


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_doc_mask_sees_each_document_of_a_packed_row_as_if_alone(pos_emb):
    """With model.doc_mask a row of documents back to back gives each one the logits (and so the
    loss) it gets alone, from its <|endoftext|> on; without it the earlier document leaks in."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=EOT + 4, block_size=32, n_layer=2, n_head=2, n_embd=32, pos_emb=pos_emb)
    tail = torch.randint(0, 1000, (2, 11))  # the end of a document cut by the row's start
    doc = torch.randint(0, 1000, (2, 20))
    doc[:, 0] = EOT
    row = torch.cat([tail, doc], dim=1)
    masked = GPT(GPTConfig(**cfg, doc_mask=True)).eval()
    torch.testing.assert_close(masked(row)[:, 11:], masked(doc), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked(row)[:, :11], masked(tail), atol=1e-5, rtol=1e-5)
    plain = GPT(GPTConfig(**cfg)).eval()
    plain.load_state_dict(masked.state_dict())
    assert not torch.allclose(plain(row)[:, 11:], plain(doc), atol=1e-3)


def test_loss_equals_plain_cross_entropy_over_the_real_vocabulary():
    model = tiny(vocab_size=250).eval()
    idx = torch.randint(0, 250, (2, 16))
    targets = torch.randint(0, 250, (2, 16))
    targets[0, :5] = -1
    loss = model(idx, targets)
    plain = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten(), ignore_index=-1)
    torch.testing.assert_close(loss, plain)


def test_masked_positions_get_the_gradients_of_plain_cross_entropy():
    """Only rows with a target reach the head (chat fine-tuning scores ~5% of them): same gradients."""
    model = tiny(vocab_size=250)
    idx = torch.randint(0, 250, (2, 16))
    targets = torch.randint(0, 250, (2, 16))
    targets[:, ::3] = -1
    model(idx, targets).backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    F.cross_entropy(model(idx).flatten(0, 1), targets.flatten(), ignore_index=-1).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, msg=n)
    model.zero_grad()
    loss = model(idx, torch.full_like(targets, -1))  # nothing to score: 0, and no NaN in the gradients
    loss.backward()
    assert loss.item() == 0.0 and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_trains_on_a_tiny_batch(name):
    model = tiny(**OPTIONS[name]).train()
    torch.manual_seed(1)
    idx = torch.randint(0, 256, (2, 16))
    targets = torch.roll(idx, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(256)) < 0.3  # starts near uniform: the init is sane
    assert losses[-1] < 0.5 * losses[0], losses[::8]


def test_tied_head_is_the_embedding_table_and_untied_is_not():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert tied.head_weight is tied.wte.weight and tied.lm_head is None
    assert untied.head_weight is not untied.wte.weight
    assert untied.num_params() - tied.num_params() == 256 * 32


def test_num_params_counts_and_excludes_embeddings():
    model = tiny()
    d, L, V, T = 32, 2, 256, 16
    per_block = 12 * d * d + 13 * d  # weights + biases (qkv 3d, proj d, fc 4d, proj d, 2 norms 4d)
    total = V * d + T * d + L * per_block + 2 * d
    assert model.num_params() == total
    assert model.num_params(non_embedding=True) == total - V * d - T * d


def test_flops_per_token_of_the_reference_model():
    with torch.device("meta"):  # no memory for 51M parameters
        model = GPT(GPTConfig())
    matmul = 8 * 12 * 512 * 512 + 50304 * 512
    assert model.flops_per_token() == 6 * matmul + 12 * 8 * 512 * 512
    assert 330e6 < model.flops_per_token() < 332e6  # PERF_NOTES' 331 MFLOP per token


def test_init_scales_residual_projections_with_depth():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=8, n_head=4, n_embd=128))
    assert model.blocks[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    resid = 0.02 / math.sqrt(16)
    assert model.blocks[3].mlp.c_proj.weight.std().item() == pytest.approx(resid, rel=0.05)
    assert model.blocks[3].attn.c_proj.weight.std().item() == pytest.approx(resid, rel=0.05)
    assert torch.all(model.blocks[0].attn.c_attn.bias == 0)


def test_swiglu_keeps_the_mlp_parameter_count_close_to_4x():
    gelu, swiglu = tiny(n_embd=192, n_head=2), tiny(n_embd=192, n_head=2, mlp="swiglu")
    assert swiglu.blocks[0].mlp.c_proj.in_features == 512  # 8/3 * 192 = 512
    assert gelu.num_params() == pytest.approx(swiglu.num_params(), rel=0.02)


def test_bias_false_removes_every_bias():
    model = tiny(bias=False)
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias")]


@pytest.mark.parametrize("bias", [True, False])
def test_one_bf16_row_takes_the_gemv_and_matches_f_linear(bias, monkeypatch):
    from tinyllm.model import linear

    torch.manual_seed(0)
    w, b = torch.randn(48, 32).bfloat16(), torch.randn(48).bfloat16() if bias else None
    x = torch.randn(1, 1, 32).bfloat16()
    calls = []
    for name in ("mv", "addmv"):
        real = getattr(torch, name)
        monkeypatch.setattr(linear.torch, name, lambda *a, _real=real, **k: calls.append(a) or _real(*a, **k))
    y = linear.linear(x, w, b)
    assert len(calls) == 1 and y.shape == (1, 1, 48) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), torch.nn.functional.linear(x, w, b).float(), rtol=2e-2, atol=2e-2)
    linear.linear(x.float(), w.float(), None if b is None else b.float())  # fp32 keeps F.linear
    linear.linear(torch.randn(1, 2, 32).bfloat16(), w, b)  # as do two rows
    assert len(calls) == 1
