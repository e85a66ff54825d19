"""Weight layout for decoding on CPU (fp32): the head column-major, the blocks packed for oneDNN.

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
- The blocks' Linear layers do better still through oneDNN's fp32 product over a copy of each
  weight packed in its own blocked layout (`PackedLinear`): a seed-size token's block products,
  weights streaming from memory, took 4.5-5.2 ms against 6.4-6.7 column-major (Zen 4, 2
  threads), and greedy decoding ran 77.5 tokens/s against 73.5 (README). So where PyTorch has oneDNN,
  `decode_layout` packs them (the copy costs their size again: 3 MB at the `cpu` preset, 100 MB at
  seed size); the weights themselves stay as trained, and serve a step that needs gradients.
- The head is packed too (`pack_head`), for one row as for many: on 2 threads oneDNN's one-row
  product streamed the seed head, [50260, 512], at 26.4 GB/s against column-major's 23.0 (3.90
  against 4.48 ms), and the `cpu` preset's [50260, 128] at 56 against 33 (0.46 against 0.78 ms);
  several rows (a server's batch of decoding requests) ran 2.1-2.6 ms for 8 rows against MKL's
  4.4-5.1 in either layout. On one thread it was the other way round for one row (6.87 against
  4.36 ms, 1.18 against 0.96), so a single row on a single thread still takes the column-major
  head. The packed copy costs the head's size again (26 MB at the `cpu` preset, 103 MB at seed size).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyllm.model.gpt import GPT
from tinyllm.model.linear import replace_linears


@functools.cache
def onednn() -> bool:
    """Whether this PyTorch runs oneDNN's fp32 product over a packed weight (`PackedLinear`)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 2))
        torch.ops.mkldnn._linear_pointwise(torch.ones(1, 2), packed, None, "none", [], "")
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return True


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
    """Lay an fp32 CPU model out for decoding (in place): the head and the blocks' Linear layers
    packed for oneDNN, the head column-major as well (without oneDNN: the head and the wide
    block layers column-major). Else unchanged."""
    head = model.head_weight
    if head.device.type != "cpu" or head.dtype != torch.float32 or model.head_proj is not None:
        return model
    if onednn():
        replace_linears(model.blocks, lambda layer: PackedLinear(layer.weight, layer.bias))
    for weight in wide_weights(model):  # the head, and block layers left unpacked
        if not is_column_major(weight):
            weight.data = weight.data.t().contiguous().t()
    return pack_head(model)


class PackedLinear(nn.Module):
    """x @ weight.T + bias through oneDNN's fp32 product over a packed copy of the weight.

    The weight and bias are the layer's own tensors (a `Linear`'s parameters keep their names in
    the state dict; a view such as the head's is an unsaved buffer, which `weight_bytes` counts);
    the copy is opaque to PyTorch and saved nowhere. `one_row`: a single row on a single thread
    takes F.linear over the weight as laid out instead (the column-major head; see the module's
    notes). A product that needs gradients takes F.linear too: oneDNN's has no backward.
    """

    # As a GPT's head_proj, the head's own values: a loss takes the fused chunked loss over
    # head_weight instead, which ran 1.1-1.5x faster than logits from here (`tinyllm eval`).
    replaces_head = False

    def __init__(self, weight: Tensor, bias: Tensor | None = None, *, one_row: bool = False) -> None:
        super().__init__()
        if isinstance(weight, nn.Parameter):
            self.weight, self.bias = weight, bias
        else:
            self.register_buffer("weight", weight, persistent=False)
            self.register_buffer("bias", bias, persistent=False)
        self.one_row = one_row
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())

    def forward(self, x: Tensor) -> Tensor:
        if ((self.one_row and x.numel() == x.shape[-1] and torch.get_num_threads() == 1)
                or (torch.is_grad_enabled() and self.weight.requires_grad)):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


@torch.no_grad()
def pack_head(model: GPT) -> GPT:
    """Give an fp32 CPU model a packed head (in place; one row on one thread still takes the
    column-major head); else unchanged (another device or dtype, an int8 head, no oneDNN)."""
    head = model.head_weight
    if (head.device.type == "cpu" and head.dtype == torch.float32 and model.head_proj is None
            and onednn()):
        model.head_proj = PackedLinear(model.head_weight[: model.config.vocab_size], one_row=True)
    return model
