"""The decoding layout: wide fp32 weights column-major on CPU, the same values and the same outputs."""

from __future__ import annotations

import torch

from tinyllm.inference.layout import (
    PackedLinear,
    decode_layout,
    is_column_major,
    pack_head,
    wide_weights,
)
from tinyllm.inference.quantize import quantize_int8, weight_bytes
from tinyllm.inference.sampling import generate
from tinyllm.model.gpt import GPT, GPTConfig


def _model(**overrides) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, **overrides})
    model = GPT(cfg).eval()
    with torch.no_grad():
        model.wte.weight.mul_(20)  # sharp logits: greedy choices are not decided by rounding noise
    return model


def test_the_head_turns_column_major_and_the_blocks_packed_with_the_same_state():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    decode_layout(model)
    assert wide_weights(model) == [model.wte.weight] and is_column_major(model.wte.weight)
    for block in model.blocks:  # every Linear layer of the blocks, its parameters kept
        for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            assert isinstance(layer, PackedLinear) and isinstance(layer.weight, torch.nn.Parameter)
            assert layer.weight.is_contiguous()  # packing copies; the weight stays as trained
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].shape == after[k].shape for k in before)
    assert isinstance(model.wte.weight, torch.nn.Parameter)
    assert isinstance(model.head_proj, PackedLinear) and model.head_proj.one_row


def test_a_laid_out_model_still_has_gradients():
    model, laid_out = _model(), decode_layout(_model())
    idx = torch.randint(0, model.config.vocab_size, (2, 20))
    for m in (model, laid_out):
        m(idx, targets=idx.roll(-1, 1)).backward()
    grads = dict(laid_out.named_parameters())
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[name].grad, atol=1e-5), name


def test_outputs_match_the_trained_layout():
    model, laid_out = _model(), decode_layout(_model())
    idx = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        assert torch.allclose(model(idx), laid_out(idx), atol=1e-4)
        loss = model(idx, targets=idx.roll(-1, 1))
        assert torch.allclose(loss, laid_out(idx, targets=idx.roll(-1, 1)), atol=1e-5)
    prompt = idx[0, :8].tolist()
    a = list(generate(model, prompt, 24, temperature=0))
    assert a == list(generate(laid_out, prompt, 24, temperature=0))
    assert a == list(generate(laid_out, prompt, 24, temperature=0, use_cache=False))


def test_an_untied_head_is_laid_out_too():
    model = decode_layout(_model(tie_embeddings=False))
    assert is_column_major(model.lm_head.weight) and model.wte.weight.is_contiguous()


def test_bf16_and_int8_models_are_left_as_they_are():
    bf16 = decode_layout(_model().to(torch.bfloat16))
    assert all(w.is_contiguous() for w in wide_weights(bf16))
    int8 = decode_layout(quantize_int8(_model()))
    assert int8.wte.weight.is_contiguous()


def test_laying_out_twice_changes_nothing_more():
    model = decode_layout(_model())
    storages = [w.data_ptr() for w in wide_weights(model)]
    decode_layout(model)
    assert [w.data_ptr() for w in wide_weights(model)] == storages


def test_a_packed_head_computes_the_same_logits_and_saves_nothing(monkeypatch):
    model, packed = _model(), decode_layout(_model())
    assert isinstance(packed.head_proj, PackedLinear)  # every decoding command gets the packed head
    assert packed.state_dict().keys() == model.state_dict().keys()
    assert weight_bytes(packed) == weight_bytes(model)  # a step reads the head once, packed or not
    idx = torch.randint(0, model.config.vocab_size, (3, 20))
    threads = torch.get_num_threads()
    try:
        # One row takes the column-major head on one thread, the packed one on more.
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.no_grad():
                # One row, a batch of decoding rows, and a whole prefill.
                for rows in (idx[:1, -1:], idx[:, -1:], idx):
                    assert torch.allclose(model(rows), packed(rows), atol=1e-4)
            prompt = idx[0, :8].tolist()
            assert list(generate(model, prompt, 24, temperature=0)) == list(generate(packed, prompt, 24, temperature=0))
    finally:
        torch.set_num_threads(threads)
    # A loss (tinyllm eval) stays on the fused loss over head_weight: logits from the packed copy were slower.
    monkeypatch.setattr("tinyllm.model.gpt.chunked_cross_entropy", lambda *a: 1 / 0)
    with torch.no_grad():
        targets = idx.roll(-1, 1)
        assert torch.allclose(model(idx, targets=targets), packed(idx, targets=targets), atol=1e-5)


def test_only_fp32_heads_are_packed():
    assert pack_head(_model().to(torch.bfloat16)).head_proj is None
    int8 = quantize_int8(_model())
    assert pack_head(int8).head_proj is not None and not isinstance(int8.head_proj, PackedLinear)
