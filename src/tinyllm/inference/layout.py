"""Weight layout for decoding on CPU: fp32 matrices with more outputs than inputs, column-major.

Why it is shaped this way:
- A cached decoding step at batch 1 multiplies one row by every weight, so its time is the
  weights' bytes over the rate the matrix-vector product streams them (`tinyllm bench decode`,
  `mbu`), and that rate depends on how the matrix lies in memory. On a 2-core AMD EPYC Zen 4
  (torch 2.13 with MKL) a one-row fp32 F.linear over the seed model's head, [50260, 512] stored
  row-major as trained, read 9 GB/s; the same values stored column-major 21 GB/s. The head of the
  `cpu` preset ([50260, 128]) ran 3.1x faster, the seed blocks' [1536, 512] and [2048, 512]
  matrices 1.7-1.8x; a matrix with more inputs than outputs ([512, 2048]) was faster row-major
  (0.7x), so it stays (README: Decoding).
- Only the strides change: each weight keeps its shape [N, K] and its values
  (`w.t().contiguous().t()`), so every caller works unchanged, the embedding lookup of a tied
  head included. Products of many rows ran at about the same speed either way (prefill and `eval`
  0.92-1.19x, a server's batch of 8 decoding rows 0.87-1.0x).
- fp32 on CPU only: a one-row bf16 product already takes `torch.mv` (`tinyllm.model.linear`),
  which was slower column-major (0.64-0.84x), and int8 layers hold their own packed copies.
  Not for training or export: a training step is many rows, and safetensors wants contiguous
  tensors, so only the commands that decode (`sample`, `chat`, `eval`, `serve`, the benchmarks)
  call `decode_layout`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tinyllm.model.gpt import GPT


def wide_weights(model: GPT) -> list[Tensor]:
    """The weights a decoding step multiplies that have more outputs than inputs: the head (the
    embedding table when tied) and the blocks' Linear layers with out_features > in_features."""
    weights = [model.head_weight]
    for module in model.blocks.modules():
        if isinstance(module, nn.Linear) and module.out_features > module.in_features:
            weights.append(module.weight)
    return weights


def is_column_major(weight: Tensor) -> bool:
    return weight.dim() == 2 and weight.stride() == (1, weight.shape[0])


@torch.no_grad()
def decode_layout(model: GPT) -> GPT:
    """Store `wide_weights` column-major (in place) when the model is fp32 on CPU; else unchanged."""
    head = model.head_weight
    if head.device.type != "cpu" or head.dtype != torch.float32 or model.head_proj is not None:
        return model
    for weight in wide_weights(model):
        if not is_column_major(weight):
            weight.data = weight.data.t().contiguous().t()
    return model
