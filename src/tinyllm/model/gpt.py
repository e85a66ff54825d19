"""A decoder-only GPT, readable top to bottom: config, parts, blocks, the model.

Shape of the design:
- GPT-2 by default (learned positions, LayerNorm with biases, 4x GELU MLP, tied embeddings, init
  std 0.02 with residual projections scaled by 1/sqrt(2 * n_layer)). Each later refinement (RoPE,
  RMSNorm, QK-norm, SwiGLU, ReLU^2, no biases, untied head) is one config switch that changes one
  small part, so every combination is the same code path with a different part plugged in.
- The embedding table (and head) has `padded_vocab_size` rows, a multiple of 64, because the head
  GEMM runs faster on round sizes. Padded ids are never inputs, never targets, and their logits are
  dropped before anything is returned, so nothing downstream can sample them.
- With targets, `forward` returns the loss through `loss.fused_linear_cross_entropy`, which never
  builds the [B, T, V] fp32 logits (the dominant memory cost on CPU). Without targets it returns
  fp32 logits, optionally for the last position only (what decoding needs).
- Attention goes through `F.scaled_dot_product_attention`. With a `KVCache` the T new tokens take
  positions cache.length .. cache.length + T - 1 and attend to every cached position plus, causally,
  to each other. With a `BatchKVCache` (independent rows of different lengths) each row feeds one
  token at its own position and attends to its own keys only (the cache's `key_mask`).
- `doc_mask`: without a cache, each document of a packed row (from its <|endoftext|>) attends only
  to itself and counts positions from its start, so it is computed as if alone, as a prompt is.
  The cache builds no such mask: a prompt is one document.

Module names (for checkpoint conversion): wte, wpe, blocks.{i}.{ln_1, attn.{c_attn, c_proj, q_norm,
k_norm}, ln_2, mlp.{c_fc, c_proj}}, ln_f, lm_head (absent when tied). SwiGLU's c_fc holds [gate; up].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyllm.model.kv_cache import KVCache
from tinyllm.model.linear import Linear, linear
from tinyllm.model.loss import chunked_cross_entropy, fused_linear_cross_entropy
from tinyllm.model.positions import apply_rope, document_mask, document_positions, rope_cos_sin

POS_EMBS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu", "relu2")


@dataclass
class GPTConfig:
    vocab_size: int = 50260
    block_size: int = 512  # context length
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 512
    dropout: float = 0.0
    bias: bool = True  # biases in every Linear and LayerNorm
    pos_emb: str = "learned"  # "learned" | "rope"
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    qk_norm: bool = False  # normalise queries and keys per head before attention
    mlp: str = "gelu"  # "gelu" | "swiglu" | "relu2"
    tie_embeddings: bool = True  # the output head reuses the token embedding table
    rope_theta: float = 10000.0
    pad_vocab_to: int = 64  # embedding rows are rounded up to a multiple of this
    # Each document in a row is seen as if alone: attention stops at its <|endoftext|>, and
    # positions count from there (as in a prompt, which starts with one).
    doc_mask: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "pad_vocab_to"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        for name, allowed in (("pos_emb", POS_EMBS), ("norm", NORMS), ("mlp", MLPS)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"model.{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}"
                )
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head size; n_embd/n_head = {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not self.rope_theta > 0:
            raise ValueError(f"model.rope_theta must be > 0, got {self.rope_theta}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to


# ---------------------------------------------------------------------------------------------
# Parts


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # The gain in the input's dtype: a bf16 input (QK-norm under autocast) with an fp32 gain misses
        # the fused kernel. The kernel still accumulates in fp32.
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def make_norm(config: GPTConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(dim)
    return nn.LayerNorm(dim, bias=config.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.dropout = config.dropout
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.q_norm = make_norm(config, config.head_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, config.head_dim) if config.qk_norm else None
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        kv_cache: KVCache | None,
        doc_mask: Tensor | None = None,
    ) -> Tensor:
        B, T, C = x.shape
        # [B, T, C] -> 3 x [B, H, T, hd]
        q, k, v = (
            t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
            for t in self.c_attn(x).split(C, dim=2)
        )
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # Norms and rope compute in fp32; under autocast v is bf16 and SDPA wants one dtype.
        q, k = q.to(v.dtype), k.to(v.dtype)
        past, mask = 0, None
        if kv_cache is not None:
            # mask: [B, 1, 1, keys] when the cache's rows have different lengths (one query each)
            past, mask = kv_cache.length, kv_cache.key_mask
            k, v = kv_cache.update(self.layer_idx, k, v)  # [B, H, past + T, hd]
            k, v = k.to(q.dtype), v.to(q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        if doc_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=doc_mask, dropout_p=dropout_p)
        elif past == 0 and mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            # Query i sits at position past + i and sees keys 0 .. past + i. (SDPA's is_causal
            # aligns the triangle top-left, which is wrong once keys outnumber queries.) A single
            # query sees every key, unless the cache masks each row's own.
            if mask is None and T > 1:
                mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, T, C)  # [B, T, C]
        return self.resid_dropout(self.c_proj(y))


def swiglu_hidden(n_embd: int) -> int:
    """8/3 * n_embd (same parameter count as a 4x MLP), rounded up to a multiple of 64."""
    return -(-(8 * n_embd // 3) // 64) * 64


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        hidden = swiglu_hidden(config.n_embd) if self.kind == "swiglu" else 4 * config.n_embd
        fc_out = 2 * hidden if self.kind == "swiglu" else hidden  # SwiGLU: gate and up in one GEMM
        self.c_fc = Linear(config.n_embd, fc_out, bias=config.bias)
        self.c_proj = Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c_fc(x)  # [B, T, fc_out]
        if self.kind == "gelu":
            h = F.gelu(h, approximate="tanh")  # GPT-2's GELU, so exports match transformers
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        kv_cache: KVCache | None,
        doc_mask: Tensor | None = None,
    ) -> Tensor:
        x = x + self.attn(self.ln_1(x), rope, kv_cache, doc_mask)
        return x + self.mlp(self.ln_2(x))


# ---------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.wpe = (
            nn.Embedding(config.block_size, config.n_embd) if config.pos_emb == "learned" else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = make_norm(config, config.n_embd)
        self.lm_head = (
            None
            if config.tie_embeddings
            else Linear(config.n_embd, config.padded_vocab_size, bias=False)
        )
        # An inference-only stand-in for the head over the real vocabulary, [.., C] -> [.., V]
        # (int8: tinyllm.inference.quantize; a packed copy: tinyllm.inference.layout); None
        # computes it from head_weight. A loss takes it only if it holds weights of its own
        # (`replaces_head`): a copy of head_weight is faster through the fused loss.
        self.head_proj: nn.Module | None = None
        self.apply(_init_weights)
        # Each block adds two residual branches; scaling their output projections keeps the
        # residual stream's variance from growing with depth (GPT-2).
        resid_std = 0.02 / math.sqrt(2 * config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.c_proj.weight, std=resid_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=resid_std)

    @property
    def head_weight(self) -> Tensor:
        """The output projection [padded_vocab_size, n_embd] (the embedding table when tied)."""
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        kv_cache: KVCache | None = None,
        *,
        last_only: bool = False,
        known_valid: bool = False,
    ) -> Tensor:
        """idx [B, T] token ids.

        With targets [B, T] (-1 = no target): the scalar mean cross-entropy. Without: fp32 logits
        [B, T, vocab_size], or [B, 1, vocab_size] for the last position when `last_only`.
        known_valid: the caller checked on the host that all ids and targets are in the vocabulary
        (none -1), so no check reads them back from the device (the trainer's hot path).
        """
        x = self._hidden(idx, kv_cache, known_valid)  # [B, T, C]
        if targets is not None and getattr(self.head_proj, "replaces_head", False):
            return chunked_cross_entropy(self.head_proj, x, targets)
        if targets is not None:
            if targets.shape != idx.shape:
                raise ValueError(
                    f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}"
                )
            return fused_linear_cross_entropy(
                x.reshape(-1, x.shape[-1]),
                self.head_weight,
                targets.reshape(-1),
                vocab_size=self.config.vocab_size,
                known_valid=known_valid,
            )
        if last_only:
            x = x[:, -1:, :]
        if self.head_proj is not None:
            return self.head_proj(x).float()
        # Only the real vocabulary: padded ids can never be sampled.
        return linear(x, self.head_weight[: self.config.vocab_size]).float()

    def _hidden(self, idx: Tensor, kv_cache: KVCache | None, known_valid: bool = False) -> Tensor:
        """Final-norm hidden states [B, T, C] for idx [B, T], appending to kv_cache if given."""
        cfg = self.config
        self._check_inputs(idx, kv_cache, known_valid)
        T = idx.shape[1]
        # [T] continuing after the cache, or [B, 1] when its rows sit at different positions
        pos = torch.arange(T, device=idx.device) if kv_cache is None else kv_cache.positions(T)
        mask = None
        if cfg.doc_mask and kv_cache is None:
            pos, mask = document_positions(idx), document_mask(idx)  # [B, T], [B, 1, T, T]

        x = self.wte(idx)  # [B, T, C]
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(pos)
        else:
            rope = rope_cos_sin(cfg.head_dim, pos, cfg.rope_theta)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, kv_cache, mask)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.ln_f(x)

    def _check_inputs(self, idx: Tensor, kv_cache: KVCache | None, known_valid: bool = False) -> None:
        cfg = self.config
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"idx must be [batch, time] with time >= 1, got {tuple(idx.shape)}")
        B, T = idx.shape
        past = 0 if kv_cache is None else kv_cache.length
        if past + T > cfg.block_size:
            raise ValueError(
                f"{past + T} positions exceed the model's context (block_size {cfg.block_size})"
            )
        if kv_cache is not None:
            if kv_cache.batch != B or kv_cache.n_layer != cfg.n_layer:
                raise ValueError(
                    f"KV cache is for batch {kv_cache.batch} x {kv_cache.n_layer} layers, "
                    f"input is batch {B} for a {cfg.n_layer}-layer model"
                )
            kv_cache.check_room(T)
        # Ids in the padding rows would silently embed as untrained vectors. Skipped under
        # torch.compile, where reading the ids back would split the graph, and for ids the caller
        # checked on the host (a read here would make the host wait for the device).
        if known_valid or torch.compiler.is_compiling():
            return
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}); got {lo}..{hi}")

    def make_kv_cache(
        self, batch_size: int = 1, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty cache sized for this model (max_len defaults to block_size)."""
        cfg = self.config
        return KVCache(
            cfg.n_layer,
            batch_size,
            cfg.n_head,
            max_len or cfg.block_size,
            cfg.head_dim,
            dtype=dtype or self.wte.weight.dtype,
            device=self.wte.weight.device,
        )

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (a tied table counted once).

        non_embedding: leave out the lookup tables (wte and wpe), as in scaling-law counts; an
        untied output head is a matmul and stays in.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs per token at full context: 6 * matmul weights + 12 * L * T * C.

        Matmul weights are the blocks' Linear weights plus the (padded) head, which is computed in
        full. The attention term counts QK^T and AV forward and backward over all block_size keys
        (nanoGPT / PaLM convention; causal masking would halve it in an ideal kernel).
        """
        cfg = self.config
        matmul = sum(m.weight.numel() for m in self.blocks.modules() if isinstance(m, nn.Linear))
        matmul += self.head_weight.numel()
        return 6.0 * matmul + 12.0 * cfg.n_layer * cfg.block_size * cfg.n_embd


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
