"""What `tinyllm bench train` compares against: the training loops people run without tinyllm.

Why it is shaped this way:
- Two peers, both fp32 and eager, at the preset's dimensions and micro-batch, on random ids (the
  content does not change the speed), with torch's AdamW and the same clipping:
  `hf`: transformers' `GPT2LMHeadModel`, loss from `labels=`, what a Hugging Face user runs;
  `plain`: the same GPT-2 model written the obvious way in this one file, as nanoGPT's model.py
  writes it (fused qkv, `F.scaled_dot_product_attention`, the whole [B, T, V] logits into
  `F.cross_entropy`, decay only on matrices, fused AdamW on CUDA only), what a user writing their
  own loop gets. Nothing of tinyllm's model, loss or trainer is used, only the preset's sizes.
- Each returns (step, info) for `bench.train`'s measuring subprocess: step() runs one optimizer
  step and returns the loss (read on the host: a sync, as tinyllm's timed step does).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path


def hf_step(spec: dict, run_dir: Path) -> tuple[Callable[[], float], dict]:
    """GPT2LMHeadModel at the preset's dimensions in a plain fp32 eager AdamW loop."""
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg, device = _preset(spec)
    m, o = cfg.model, cfg.optim
    hf = GPT2Config(vocab_size=m.vocab_size, n_positions=m.block_size, n_embd=m.n_embd, n_layer=m.n_layer,
                    n_head=m.n_head, resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout)
    model = GPT2LMHeadModel(hf).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                  weight_decay=o.weight_decay)
    step = _loop(lambda ids: model(input_ids=ids, labels=ids).loss, model, optimizer, spec, cfg, device)
    info = {"name": f"transformers {transformers.__version__} GPT2LMHeadModel, fp32 eager, torch.optim.AdamW",
            "attn_implementation": model.config._attn_implementation, "parameters": model.num_parameters()}
    return step, {**info, **_shape_info(spec, cfg, device)}


def plain_step(spec: dict, run_dir: Path) -> tuple[Callable[[], float], dict]:
    """The one-file GPT below in a plain fp32 eager AdamW loop."""
    import torch
    import torch.nn.functional as F

    cfg, device = _preset(spec)
    m, o = cfg.model, cfg.optim
    model = _plain_gpt(m.vocab_size, m.block_size, m.n_layer, m.n_head, m.n_embd).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                  fused=device.type == "cuda")

    def loss_of(ids):
        logits = model(ids)  # [B, T, V]
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))

    info = {"name": "plain PyTorch GPT-2 (nanoGPT-style, one file), fp32 eager, torch.optim.AdamW",
            "attn_implementation": "sdpa", "parameters": sum(p.numel() for p in model.parameters())}
    return _loop(loss_of, model, optimizer, spec, cfg, device), {**info, **_shape_info(spec, cfg, device)}


def _preset(spec: dict):
    import torch

    from tinyllm.config import resolve
    from tinyllm.runtime.device import pick_device

    cfg = resolve(spec["preset"])
    torch.manual_seed(cfg.train.seed)
    return cfg, pick_device(cfg.train.device)


def _shape_info(spec: dict, cfg, device) -> dict:
    return {"tokens_per_step": spec["micro_batch"] * cfg.model.block_size, "device": device,
            "cuda": device.type == "cuda"}


def _loop(loss_of, model, optimizer, spec: dict, cfg, device) -> Callable[[], float]:
    import torch

    vocab, clip = cfg.model.vocab_size, cfg.optim.grad_clip

    def step() -> float:
        ids = torch.randint(0, vocab, (spec["micro_batch"], cfg.model.block_size), device=device)
        loss = loss_of(ids)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def _plain_gpt(vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int):
    """GPT-2 as most people write it: learned positions, pre-LayerNorm blocks, GELU, tied head."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
            self.c_attn, self.attn_proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
            self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
            x = x + self.attn_proj(y)
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
            self.blocks = nn.ModuleList(Block() for _ in range(n_layer))
            self.ln_f = nn.LayerNorm(n_embd)
            for name, p in self.named_parameters():
                if p.dim() >= 2:
                    std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("attn_proj.weight", "mlp.2.weight")) else 0.02
                    nn.init.normal_(p, std=std)
                elif name.endswith("bias"):
                    nn.init.zeros_(p)

        def forward(self, idx):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
            for block in self.blocks:
                x = block(x)
            return self.ln_f(x) @ self.wte.weight.t()  # the tied head: [B, T, vocab_size]

    return GPT()
