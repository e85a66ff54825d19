"""The chunked head + cross-entropy gives the plain loss and gradients without the full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tinyllm.model import GPT, GPTConfig, fused_linear_cross_entropy

N, D, V, VP = 150, 24, 100, 128  # VP - V padded columns


def make(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(VP, D, generator=g, dtype=dtype) * 0.5).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    y[::9] = -1
    return h, w, y


def plain(h, w, y):
    return F.cross_entropy((h @ w.t())[:, :V].float(), y, ignore_index=-1)


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk_size", [1, 32, 37, 150, 4096])
def test_fp32_loss_and_grads_equal_plain(chunk_size):
    h, w, y = make()
    fused = fused_linear_cross_entropy(h, w, y, vocab_size=V, chunk_size=chunk_size)
    ref = plain(h, w, y)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads(fused, h, w), grads(ref, h, w), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_padded_columns_take_no_mass_and_get_no_gradient():
    h, w, y = make()
    with torch.no_grad():
        w[V:] = 50.0  # would dominate the softmax if they were not excluded
    loss = fused_linear_cross_entropy(h, w, y, vocab_size=V, chunk_size=40)
    torch.testing.assert_close(loss, plain(h, w, y), atol=1e-5, rtol=1e-5)
    (gw,) = grads(loss, w)
    assert torch.all(gw[V:] == 0)


def test_bf16_autocast_matches_plain_autocast_loosely():
    h, w, y = make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = fused_linear_cross_entropy(h, w, y, vocab_size=V, chunk_size=64)
        ref = plain(h, w, y)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, ref, atol=2e-2, rtol=2e-2)
    for a, b in zip(grads(fused, h, w), grads(ref, h, w), strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=2e-3, rtol=5e-2)


def test_gradients_accumulate_and_scale_with_the_upstream_gradient():
    h, w, y = make()
    for _ in range(2):
        (fused_linear_cross_entropy(h, w, y, vocab_size=V, chunk_size=50) * 0.5).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    plain(h, w, y).backward()  # two halves add up to one whole
    torch.testing.assert_close(gh, h.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, w.grad, atol=1e-5, rtol=1e-5)


def test_unscaled_backward_twice_on_one_graph_accumulates():
    h, w, y = make()
    loss = fused_linear_cross_entropy(h, w, y, vocab_size=V, chunk_size=50)
    loss.backward(retain_graph=True)
    loss.backward()  # the saved gradients must not have been modified by the first pass
    gh, gw = grads(plain(h, w, y), h, w)
    torch.testing.assert_close(h.grad, 2 * gh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, 2 * gw, atol=1e-5, rtol=1e-5)


def test_tied_weight_gets_gradient_from_embedding_and_head():
    torch.manual_seed(0)
    table = torch.randn(VP, D, requires_grad=True)
    idx = torch.randint(0, V, (N,))
    y = torch.randint(0, V, (N,))

    def run(loss_fn):
        h = torch.tanh(table[idx])  # [N, D]: the table used as an embedding ...
        return torch.autograd.grad(loss_fn(h, table, y), table)[0]  # ... and as the head

    fused = run(lambda h, w, t: fused_linear_cross_entropy(h, w, t, vocab_size=V, chunk_size=64))
    torch.testing.assert_close(fused, run(plain), atol=1e-5, rtol=1e-5)


def test_no_grad_gives_the_same_loss():
    h, w, y = make()
    with torch.no_grad():
        loss = fused_linear_cross_entropy(h, w, y, vocab_size=V, chunk_size=16)
    torch.testing.assert_close(loss, plain(h, w, y), atol=1e-5, rtol=1e-5)


def test_all_ignored_targets_give_zero_loss_and_zero_grads():
    h, w, _ = make()
    y = torch.full((N,), -1)
    loss = fused_linear_cross_entropy(h, w, y, vocab_size=V)
    assert loss.item() == 0.0
    gh, gw = grads(loss, h, w)
    assert torch.all(gh == 0) and torch.all(gw == 0)


def test_bad_shapes_and_targets_raise():
    h, w, y = make()
    with pytest.raises(ValueError, match="shape mismatch"):
        fused_linear_cross_entropy(h[:10], w, y)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fused_linear_cross_entropy(h, w, torch.full((N,), V), vocab_size=V)


def test_model_loss_and_grads_equal_a_plain_head_through_the_whole_model():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=250, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = GPT(cfg)
    idx, targets = torch.randint(0, 250, (2, 16)), torch.randint(0, 250, (2, 16))
    fused = torch.autograd.grad(model(idx, targets), list(model.parameters()))
    ref_loss = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    ref = torch.autograd.grad(ref_loss, list(model.parameters()))
    for a, b in zip(fused, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_only_rows_with_a_target_reach_the_head_in_a_few_heights(monkeypatch):
    """Chat fine-tuning scores ~5% of positions: the vocabulary projection must skip the rest. The
    rows it keeps are padded with ignored ones to a multiple of ROW_BUCKET, so batches with 15, 40
    or 64 scored rows share one GEMM shape (a new shape per batch made oneDNN's bf16 path build a
    kernel, and keep a copy of the head weight, for each: SFT ran slower than fp32 in 5 GB)."""
    from tinyllm.model import loss

    seen = []
    original = loss._loss_and_grads

    def spy(h, *args, **kwargs):
        seen.append(h.shape[0])
        return original(h, *args, **kwargs)

    monkeypatch.setattr(loss, "_loss_and_grads", spy)
    for scored in (15, 40, 64, 65):
        h, w, y = make()
        y = torch.where(torch.arange(N) < scored, y.clamp(min=0), -1)
        fused = fused_linear_cross_entropy(h, w, y, vocab_size=V)
        ref = plain(h, w, y)
        for a, b in zip(grads(fused, h, w), grads(ref, h, w), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    assert loss.ROW_BUCKET == 64 and seen == [64, 64, 64, 128]


def test_the_fused_loss_runs_eagerly_under_torch_compile():
    """Traced, its row-block loop would unroll into one huge graph: torch.compile leaves it out."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    loss = torch.compile(lambda h, w, t: fused_linear_cross_entropy(h, w, t), backend=counter)
    torch.testing.assert_close(loss(h := torch.randn(8, 16), w := torch.randn(32, 16), t := torch.randint(0, 32, (8,))),
                               F.cross_entropy(h @ w.t(), t))
    assert counter.op_count == 0
