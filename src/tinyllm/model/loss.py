"""Vocabulary projection fused with cross-entropy, computed in row chunks.

Why this module exists: the plain `F.cross_entropy(h @ W.T, y)` materialises the fp32 logits
[N, V] and, in backward, their gradient of the same size: 1.65 GB for a 16x512 micro-batch with
GPT-2's vocabulary. On CPU that traffic, and the page faults from allocations that large, cost more
than the matmuls (README, "Speed and quality": 3.2 GB peak for the seed preset, the peer's 10.6).
Here the head is applied to `chunk_size` rows at a time, and each chunk's gradient is finished
while its logits are still hot:

    logits_c = h_c @ W.T * log2(e)            [n, Vp]  (autocast dtype, e.g. bf16; base-2 units)
    p_c      = softmax(logits_c in fp32)      [n, Vp]  (2^x, padded columns masked to -inf)
    g_c      = (p_c - onehot(y_c)) / n_valid  [n, Vp]  d loss / d logits_c, over logits_c
    grad_h_c = g_c @ W                        [n, d]
    grad_W  += g_c.T @ h_c                    [Vp, d]  (accumulated in fp32)

so the forward already holds the gradients and backward only scales them by `grad_output`. The
softmax runs a few rows at a time (`SOFTMAX_ROWS`) so that its passes stay in cache. Peak extra
memory is one [chunk_size, Vp] logits buffer in the matmul dtype, reused across chunks, a few fp32
rows, grad_W and grad_h.

Conventions: targets equal to -1 are ignored; the loss is the mean over the others. Columns at
and beyond `vocab_size` (the padding that makes the head GEMM fast) never take probability mass and
receive zero gradient. A batch whose targets are all ignored has loss 0 and zero gradients (plain
cross-entropy gives NaN there, which would poison a gradient-accumulation sum).

`chunked_cross_entropy` is the plain loss for a head that is not one weight matrix (int8
inference weights: `tinyllm eval --quantize int8`), a chunk of rows at a time for the same reason.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -1
# Rows per chunk: 1024 rows x 50,304 columns is a 206 MB fp32 buffer, reused for every chunk.
# Larger chunks were no faster and held more memory (+0.5 GB peak at 2048 against +0.3 at 1024;
# unchunked, +4.7 GB and 1.5x the time).
DEFAULT_CHUNK_SIZE = 1024
# Rows whose softmax is worked through at a time: 16 x 50,304 fp32 is 3.2 MB, which stays in a
# core's L2 through the ~8 passes (convert, max, subtract, exp, sum, scale, scatter, convert back)
# instead of streaming a 206 MB chunk from memory for each: a chunk's softmax ran 3.7x faster in
# blocks of 16 rows than in one piece, and blocks of 8 gained little more (README).
SOFTMAX_ROWS = 16
# The logits are computed in base-2 units (h scaled by log2 e before the head product) so the
# softmax exponentiates with exp2: on CPU torch's exp2 ran 3.3x faster than its exp (5.6 vs 1.7
# G/s on 2 Zen 4 cores), and the exponentials were the largest non-GEMM cost of the cpu preset's
# step. Probabilities and gradients are the same; the loss is converted back to nats.
LOG2E, LN2 = 1.0 / math.log(2.0), math.log(2.0)
# The head's height when only some rows are scored is rounded up to a multiple of this (below).
ROW_BUCKET = 64


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
        # Always scaled, even by the usual 1.0: testing for it would read grad_output back, and
        # on a GPU that makes the host wait for the device (a pass over grad_W costs less). Not in
        # place: a second backward through the same graph must find the saved gradients intact.
        return grad_h * grad_output.to(grad_h.dtype), grad_w * grad_output.to(grad_w.dtype), None, None, None


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
    n_valid = valid.sum().clamp(min=1)  # a device scalar: counting on the host would wait for the device
    h_c, w_c = h.to(cdtype), weight.to(cdtype)
    h_2 = (h * LOG2E).to(cdtype)  # for the logits only: the gradient products take h_c
    logits_buf = torch.empty(min(chunk_size, n_rows), vp, dtype=cdtype, device=h.device)
    # fp32 rows for the softmax of low-precision logits; fp32 logits are worked on in place.
    scratch = None
    if cdtype != torch.float32:
        scratch = torch.empty(min(SOFTMAX_ROWS, n_rows), vp, dtype=torch.float32, device=h.device)
    loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = grad_w = gw_low = None
    if with_grads:
        grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
        # Each chunk's low-precision grad_W product [Vp, d] lands here before the fp32 sum.
        gw_low = None if cdtype == torch.float32 else torch.empty_like(w_c)
    ids = targets.clamp(min=0).unsqueeze(1)  # [N, 1]; ignored rows point at 0
    scale_all = (valid.to(torch.float32) / n_valid).unsqueeze(1)  # [N, 1]: d loss / d row-loss

    for start in range(0, n_rows, chunk_size):
        end = min(start + chunk_size, n_rows)
        logits = logits_buf[: end - start]
        torch.mm(h_2[start:end], w_c.t(), out=logits)  # [n, Vp], in cdtype, base 2
        for r in range(start, end, SOFTMAX_ROWS):
            rows = slice(r, min(r + SOFTMAX_ROWS, end))
            block = logits[rows.start - start : rows.stop - start]
            loss_sum += _softmax_rows(block, ids[rows], scale_all[rows], vocab_size, scratch, with_grads)
        if with_grads:  # `logits` now holds d loss / d logits
            _accumulate_chunk_grads(logits, h_c[start:end], w_c, grad_h[start:end], grad_w, gw_low)

    loss = loss_sum / n_valid  # no valid row: loss_sum is 0
    if with_grads:
        grad_w = grad_w.to(weight.dtype)
    return loss, grad_h, grad_w


def _softmax_rows(
    block: Tensor, ids: Tensor, scale: Tensor, vocab_size: int, scratch: Tensor | None, with_grads: bool
) -> Tensor:
    """The scaled loss in nats of a few rows of base-2 logits [r, Vp] (summed; ignored rows have scale 0), in fp32.

    With grads, `block` is overwritten with d loss / d logits = (softmax - onehot) * scale.
    """
    x = block if scratch is None else scratch[: block.shape[0]].copy_(block)
    x[:, vocab_size:] = float("-inf")
    target_logit = x.gather(1, ids)  # [r, 1]
    # log-sum-exp by hand, in place: torch.logsumexp allocates [r, Vp] temporaries, and the
    # exponentials it throws away are the softmax the gradient needs.
    row_max = x.amax(dim=1, keepdim=True)  # [r, 1]
    exps = x.sub_(row_max).exp2_()  # [r, Vp]; padded columns: 2^-inf = 0
    sum_exp = exps.sum(dim=1, keepdim=True)  # [r, 1]
    valid = (scale > 0).to(torch.float32)
    loss = ((row_max + sum_exp.log2() - target_logit) * valid).sum() * LN2
    if with_grads:
        g = exps.mul_(scale / sum_exp)
        g.scatter_add_(1, ids, -scale)
        if scratch is not None:
            block.copy_(g)  # the backward matmuls run in the autocast dtype too
    return loss


def _accumulate_chunk_grads(
    g: Tensor, h_c: Tensor, w_c: Tensor, grad_h: Tensor, grad_w: Tensor, gw_low: Tensor | None
) -> None:
    """From g = d loss / d logits [n, Vp] (in w_c's dtype): write grad_h [n, d], add into grad_w [Vp, d]."""
    if grad_h.dtype == g.dtype:
        torch.mm(g, w_c, out=grad_h)
    else:
        grad_h.copy_(g @ w_c)
    if gw_low is None:
        grad_w.addmm_(g.t(), h_c)
    else:
        # Summed in fp32 so that adding up chunks loses no bits.
        grad_w.add_(torch.mm(g.t(), h_c, out=gw_low))


def _scored_rows(keep: Tensor) -> Tensor:
    """Indices of the rows with a target first, padded with ignored rows to a multiple of
    ROW_BUCKET. A head GEMM of a new height every batch made oneDNN build (and keep) a bf16 kernel
    with its own copy of the 25 MB head weight for each: SFT in bf16 ran slower than fp32 and
    held 5 GB."""
    n = int(keep.sum())
    m = min(keep.numel(), -(-n // ROW_BUCKET) * ROW_BUCKET)
    return torch.argsort((~keep).to(torch.uint8), stable=True)[:m]


# Runs eagerly under torch.compile: it is already a hand-scheduled loop of large kernels, and
# tracing it would unroll hundreds of row blocks into one graph (minutes of C++ compilation) and
# break the graph at its data-dependent checks anyway.
@torch.compiler.disable
def fused_linear_cross_entropy(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    vocab_size: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    known_valid: bool = False,
) -> Tensor:
    """Mean cross-entropy of `h @ weight.T` against `targets`, without the full logits.

    h: [N, d] hidden states; weight: [Vp, d] head weight (Vp may include padding rows);
    targets: [N] ids in [0, vocab_size) or -1 (ignored). Columns >= `vocab_size` (default: all of
    Vp) are excluded from the softmax. Returns a scalar fp32 loss that backpropagates into `h` and
    `weight`. Under autocast the matmuls run in autocast's dtype and the softmax in fp32.

    known_valid: the caller has checked on the host that every target is in [0, vocab_size) (none
    ignored), so nothing here reads the targets back (on a GPU each read waits for the device).
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
    if not known_valid:
        _check_targets(targets, vocab_size)
    keep = targets != IGNORE_INDEX
    if not known_valid and not bool(keep.all()):
        # Chat fine-tuning scores assistant tokens only (~5% of positions on the builtin corpus):
        # the vocabulary projection, most of the step, runs on those rows alone. Indexing is
        # differentiable: the dropped rows get zero gradient.
        rows = _scored_rows(keep)
        h, targets = h[rows], targets[rows]
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


def chunked_cross_entropy(head: nn.Module, x: Tensor, targets: Tensor, rows: int = 1024) -> Tensor:
    """Mean cross-entropy of head(x) [.., V] over targets != -1, `rows` rows of logits at a time.

    For a `head_proj` (inference only): the fused loss needs the head as one weight matrix.
    """
    x, targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1)  # [N, C], [N]
    total = torch.zeros((), device=x.device)
    for i in range(0, x.shape[0], rows):
        logits = head(x[i : i + rows]).float()  # [n, V]
        total += F.cross_entropy(logits, targets[i : i + rows], ignore_index=-1, reduction="sum")
    return total / (targets != -1).sum().clamp(min=1)
