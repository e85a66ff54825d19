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
- A product of several rows (a server's batch of decoding requests, a prompt's prefill) is a
  different kernel: MKL's fp32 GEMM over the `cpu` preset's [50260, 128] head took 4.4-5.1 ms for
  8 rows on one Zen 4 core, in either layout, and oneDNN's over a copy packed in its own blocked
  layout 2.1-2.6 ms (16 rows 3.0 against 5.2, 32 rows 5.1 against 8.9); for one row it was slower
  (1.1 against 0.9 ms). So the server's worker, which decodes batches, gives the head a packed copy
  for two rows or more (`pack_head`) and keeps the column-major product for one; a process that
  decodes one row at a time (`sample`, `chat`) does not pay the copy's memory (the head's size again).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


class PackedHead(nn.Module):
    """The head [V, C] as a `head_proj`: one row through F.linear over the (column-major) weight,
    several through oneDNN's GEMM over a packed copy. The copy is opaque to PyTorch (not a buffer,
    not in any state dict); the weight is registered, unsaved, so `weight_bytes` counts the bytes
    a one-row step reads."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight)

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() == x.shape[-1]:
            return F.linear(x, self.weight)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


@torch.no_grad()
def pack_head(model: GPT) -> GPT:
    """Give an fp32 CPU model a `PackedHead` (in place) for products of several rows; else unchanged
    (another device or dtype, an int8 head, or a PyTorch built without oneDNN)."""
    head = model.head_weight
    if (head.device.type != "cpu" or head.dtype != torch.float32 or model.head_proj is not None
            or not torch.backends.mkldnn.is_available()):
        return model
    try:
        model.head_proj = PackedHead(head[: model.config.vocab_size])
    except RuntimeError:  # a oneDNN build without this fp32 kernel: the plain product still works
        pass
    return model
