"""Vocabulary projection fused with cross-entropy, computed in row chunks.

Why this module exists: the plain `F.cross_entropy(h @ W.T, y)` materialises the fp32 logits
[N, V] and, in backward, their gradient of the same size: 1.65 GB for a 16x512 micro-batch with
GPT-2's vocabulary. On CPU that traffic, and the page faults from allocations that large, cost more
than the matmuls (see shared/PERF_NOTES.md). Here the head is applied to `chunk_size` rows at a
time, and each chunk's gradient is finished while its logits are still hot:

    logits_c = h_c @ W.T                      [n, Vp]  (autocast dtype, e.g. bf16)
    p_c      = softmax(logits_c in fp32)      [n, Vp]  (padded columns masked to -inf)
    g_c      = (p_c - onehot(y_c)) / n_valid  [n, Vp]  d loss / d logits_c
    grad_h_c = g_c @ W                        [n, d]
    grad_W  += g_c.T @ h_c                    [Vp, d]  (accumulated in fp32)

so the forward already holds the gradients and backward only scales them by `grad_output`. Peak
extra memory is a few [chunk_size, Vp] buffers, reused across chunks, plus grad_W and grad_h.

Conventions: targets equal to -1 are ignored; the loss is the mean over the others. Columns at
and beyond `vocab_size` (the padding that makes the head GEMM fast) never take probability mass and
receive zero gradient. A batch whose targets are all ignored has loss 0 and zero gradients (plain
cross-entropy gives NaN there, which would poison a gradient-accumulation sum).
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -1
# Rows per chunk: 1024 rows x 50,304 columns is a 206 MB fp32 buffer, reused for every chunk.
# Measured 2026-11-25 on the dev CPU (head alone, d=512, one thread, CPU seconds for fwd+bwd):
# 16x512 rows fp32: plain 16.2 s / +4.7 GB peak RSS, chunks of 1024: 10.9 s / +0.31 GB, of 2048:
# 11.1 s / +0.51 GB. 4096 was no faster at 2048 rows. Smaller chunks are leaner at no cost.
DEFAULT_CHUNK_SIZE = 1024


def _compute_dtype(h: Tensor) -> torch.dtype:
    """The dtype for the head matmuls: autocast's when autocast is on, else the input's."""
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return h.dtype


def _check_targets(targets: Tensor, vocab_size: int) -> None:
    bad = (targets < IGNORE_INDEX) | (targets >= vocab_size)
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(
            f"target id {value} is outside the vocabulary [0, {vocab_size}) "
            f"(use {IGNORE_INDEX} for positions that have no target)"
        )


def _chunk_logits_fp32(
    h_c: Tensor, w_c: Tensor, vocab_size: int, buf: Tensor, buf_low: Tensor | None
) -> Tensor:
    """fp32 logits [n, Vp] for one chunk, padded columns set to -inf, written into `buf`."""
    n = h_c.shape[0]
    out = buf[:n]
    if buf_low is None:
        torch.mm(h_c, w_c.t(), out=out)
    else:
        # The matmul runs in autocast's dtype, as autocast promises; the softmax runs in fp32.
        low = buf_low[:n]
        torch.mm(h_c, w_c.t(), out=low)
        out.copy_(low)
    out[:, vocab_size:] = float("-inf")
    return out


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, h: Tensor, weight: Tensor, targets: Tensor, vocab_size: int, chunk_size: int
    ) -> Tensor:
        # h [N, d], weight [Vp, d], targets [N]
        cdtype = _compute_dtype(h)
        with torch.autocast(h.device.type, enabled=False):
            loss, grad_h, grad_w = _loss_and_grads(
                h, weight, targets, vocab_size, chunk_size, cdtype
            )
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        # The usual caller backpropagates 1.0 (or 1/accumulation_steps): skip the copy for 1.0.
        if grad_output.numel() == 1 and float(grad_output) == 1.0:
            return grad_h, grad_w, None, None, None
        return (
            grad_h * grad_output.to(grad_h.dtype),
            grad_w * grad_output.to(grad_w.dtype),
            None,
            None,
            None,
        )


def _loss_and_grads(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    vocab_size: int,
    chunk_size: int,
    cdtype: torch.dtype,
    with_grads: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Loss and (optionally) its gradients wrt h [N, d] and weight [Vp, d], chunk by chunk."""
    n_rows, vp = h.shape[0], weight.shape[0]
    valid = targets != IGNORE_INDEX  # [N]
    n_valid = int(valid.sum())
    h_c, w_c = h.to(cdtype), weight.to(cdtype)
    buf = torch.empty(min(chunk_size, n_rows), vp, dtype=torch.float32, device=h.device)
    buf_low = None if cdtype == torch.float32 else torch.empty_like(buf, dtype=cdtype)
    loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = grad_w = gw_low = None
    if with_grads:
        grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
        # Each chunk's low-precision grad_W product [Vp, d] lands here before the fp32 sum.
        gw_low = None if cdtype == torch.float32 else torch.empty_like(w_c)
    scale_all = valid.to(torch.float32) / max(n_valid, 1)  # [N]: d loss / d row-loss

    for start in range(0, n_rows, chunk_size):
        end = min(start + chunk_size, n_rows)
        logits = _chunk_logits_fp32(h_c[start:end], w_c, vocab_size, buf, buf_low)  # [n, Vp]
        y = targets[start:end].clamp(min=0).unsqueeze(1)  # [n, 1]; ignored rows point at 0
        target_logit = logits.gather(1, y)  # [n, 1]
        # log-sum-exp by hand, in place in the chunk buffer: torch.logsumexp allocates [n, Vp]
        # temporaries, and the exponentials it throws away are the softmax the gradient needs.
        row_max = logits.amax(dim=1, keepdim=True)  # [n, 1]
        exps = logits.sub_(row_max).exp_()  # [n, Vp]; padded columns: exp(-inf) = 0
        sum_exp = exps.sum(dim=1, keepdim=True)  # [n, 1]
        row_loss = (row_max + sum_exp.log() - target_logit).squeeze(1)  # [n]
        loss_sum += (row_loss * valid[start:end]).sum()
        if with_grads:
            # (softmax - onehot) * scale = d loss / d logits, still in place.
            scale = scale_all[start:end].unsqueeze(1)  # [n, 1]
            g = exps.mul_(scale / sum_exp)
            g.scatter_add_(1, y, -scale)
            _accumulate_chunk_grads(
                g, h_c[start:end], w_c, grad_h[start:end], grad_w, buf_low, gw_low
            )

    loss = loss_sum / n_valid if n_valid > 0 else loss_sum
    if with_grads:
        grad_w = grad_w.to(weight.dtype)
    return loss, grad_h, grad_w


def _accumulate_chunk_grads(
    g: Tensor,
    h_c: Tensor,
    w_c: Tensor,
    grad_h: Tensor,
    grad_w: Tensor,
    buf_low: Tensor | None,
    gw_low: Tensor | None,
) -> None:
    """From g = d loss / d logits [n, Vp] (fp32): write grad_h [n, d], add into grad_w [Vp, d]."""
    if buf_low is not None:
        g = buf_low[: g.shape[0]].copy_(g)  # the backward matmuls run in the autocast dtype too
    if grad_h.dtype == g.dtype:
        torch.mm(g, w_c, out=grad_h)
    else:
        grad_h.copy_(g @ w_c)
    if gw_low is None:
        grad_w.addmm_(g.t(), h_c)
    else:
        # Summed in fp32 so that adding up chunks loses no bits.
        grad_w.add_(torch.mm(g.t(), h_c, out=gw_low))


def fused_linear_cross_entropy(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    vocab_size: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Mean cross-entropy of `h @ weight.T` against `targets`, without the full logits.

    h: [N, d] hidden states; weight: [Vp, d] head weight (Vp may include padding rows);
    targets: [N] ids in [0, vocab_size) or -1 (ignored). Columns >= `vocab_size` (default: all of
    Vp) are excluded from the softmax. Returns a scalar fp32 loss that backpropagates into `h` and
    `weight`. Under autocast the matmuls run in autocast's dtype and the softmax in fp32.
    """
    if h.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError(
            f"expected h [N, d], weight [V, d], targets [N]; got {tuple(h.shape)}, "
            f"{tuple(weight.shape)}, {tuple(targets.shape)}"
        )
    if h.shape[0] != targets.shape[0] or h.shape[1] != weight.shape[1]:
        raise ValueError(
            f"shape mismatch: h {tuple(h.shape)}, weight {tuple(weight.shape)}, "
            f"targets {tuple(targets.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    if not 0 < vocab_size <= weight.shape[0]:
        raise ValueError(f"vocab_size {vocab_size} must be in [1, {weight.shape[0]}]")
    _check_targets(targets, vocab_size)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(h, weight, targets, vocab_size, chunk_size)
    # Evaluation: the same chunked loss, without computing any gradient.
    with torch.no_grad():
        cdtype = _compute_dtype(h)
        with torch.autocast(h.device.type, enabled=False):
            loss, _, _ = _loss_and_grads(
                h, weight, targets, vocab_size, chunk_size, cdtype, with_grads=False
            )
    return loss
