"""int8 inference (`--quantize int8`): logits close to the fp32 model's, the same greedy tokens,
KV-cache decoding equal to recomputation, and the loss path `eval` uses."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tinyllm.cli.run_args import QUANTIZE_CHOICES as CLI_CHOICES
from tinyllm.errors import UserError
from tinyllm.inference.quantize import (
    GEMV_ROWS,
    QUANTIZE_CHOICES,
    Int8Linear,
    quantize_int8,
    quantize_model,
    quantize_rows,
    weight_bytes,
)
from tinyllm.inference.sampling import generate
from tinyllm.model.gpt import GPT, GPTConfig


def _pair(**overrides) -> tuple[GPT, GPT]:
    """A small model with sharpened logits (greedy choices are not decided by rounding noise)
    and an int8 copy of it."""
    torch.manual_seed(0)
    cfg = GPTConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, **overrides})
    model = GPT(cfg).eval()
    with torch.no_grad():
        model.wte.weight.mul_(20)
    int8 = GPT(cfg).eval()
    int8.load_state_dict(model.state_dict())
    return model, quantize_int8(int8)


def test_rows_are_quantized_with_one_scale_each():
    w = torch.randn(48, 32) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different sizes
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    assert q.abs().amax(dim=1).eq(127).all()  # every row uses its full range
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()  # rounding: at most half a step of its own row


@pytest.mark.parametrize("rows", [1, GEMV_ROWS, GEMV_ROWS + 1])  # fbgemm's kernel, then the dequantized GEMM
def test_int8_linear_is_close_to_fp32(rows):
    torch.manual_seed(0)
    w, b, x = torch.randn(96, 64) * 0.02, torch.randn(96), torch.randn(rows, 64)
    y = Int8Linear(w, b)(x)
    exact = x @ w.T + b
    assert y.shape == (rows, 96) and y.dtype == torch.float32
    # int8 weights (and at a few rows 8-bit activations): within 2% of the output's scale.
    assert (y - exact).abs().max() <= 0.02 * exact.abs().max()


def test_int8_model_logits_are_close_to_fp32():
    model, int8 = _pair()
    idx = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact, approx = model(idx), int8(idx)
        last = int8(idx[:1], last_only=True)
    assert approx.shape == exact.shape and approx.dtype == torch.float32
    # Tolerance: 2% of the logits' range, relative error of the whole tensor under 1%.
    assert (approx - exact).abs().max() <= 0.02 * exact.abs().max()
    assert (approx - exact).norm() <= 0.01 * exact.norm()
    assert (last[0, -1] - exact[0, -1]).abs().max() <= 0.02 * exact.abs().max()


def test_int8_model_loss_is_close_to_fp32():
    """The loss `tinyllm eval --quantize int8` reports goes through the int8 head."""
    model, int8 = _pair()
    idx = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -1
    with torch.no_grad():
        exact = model(idx, targets)
        approx = int8(idx, targets)
        plain = torch.nn.functional.cross_entropy(int8(idx)[:, :-1].reshape(-1, model.config.vocab_size),
                                                  idx[:, 1:].reshape(-1))
    assert approx.item() == pytest.approx(plain.item(), rel=1e-5)
    assert approx.item() == pytest.approx(exact.item(), rel=0.01)


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_int8_greedy_tokens_equal_fp32(pos_emb):
    model, int8 = _pair(pos_emb=pos_emb)
    prompt = [5, 17, 300, 2, 9]
    assert list(generate(int8, prompt, 20, temperature=0)) == list(generate(model, prompt, 20, temperature=0))


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_int8_kv_cache_decoding_equals_recomputation(pos_emb):
    _, int8 = _pair(pos_emb=pos_emb, block_size=32)
    prompt = [7, 1, 99, 4]
    # 40 tokens: past the context, where RoPE re-encodes and learned positions stop.
    with pytest.warns(UserWarning) if pos_emb == "learned" else contextlib.nullcontext():
        cached = list(generate(int8, prompt, 40, temperature=0, use_cache=True))
    with pytest.warns(UserWarning) if pos_emb == "learned" else contextlib.nullcontext():
        recomputed = list(generate(int8, prompt, 40, temperature=0, use_cache=False))
    assert cached == recomputed and len(cached) >= 20


def test_int8_streams_sampled_tokens_repeatably():
    _, int8 = _pair()
    first = list(generate(int8, [3, 4], 12, temperature=1.0, top_k=20, seed=5))
    assert first == list(generate(int8, [3, 4], 12, temperature=1.0, top_k=20, seed=5)) and len(first) == 12


def test_quantized_weights_are_a_quarter_of_the_bytes():
    model, int8 = _pair()
    # int8 values plus an fp32 scale (and bias) per row: a little over a quarter.
    assert 0.25 < weight_bytes(int8) / weight_bytes(model) < 0.3


def test_quantize_model_none_leaves_the_model_and_a_bad_mode_is_a_clear_error():
    model, _ = _pair()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert quantize_model(model, "none") is model and model.head_proj is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(UserError, match="int4.*none, int8"):
        quantize_model(model, "int4")
    assert CLI_CHOICES == QUANTIZE_CHOICES  # the CLI's copy (kept for a torch-free --help)



@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_int8_rows_of_the_servers_batch_decoder_match_each_request_alone(pos_emb):
    """serve --quantize int8 decodes its running requests in one forward: rows share fbgemm's
    activation scale, and on a sharpened model still give each request its own greedy tokens."""
    from tests.inference.test_batch import PROMPTS, alone, run_batched, tiny

    model = quantize_int8(tiny(pos_emb=pos_emb))
    params = {k: {"temperature": 0} for k in PROMPTS}
    got = run_batched(model, params)
    for key in PROMPTS:
        expect = alone(model, key, params[key])
        assert got[key] == expect[: len(got[key])] and got[key]
