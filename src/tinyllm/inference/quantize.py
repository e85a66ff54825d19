"""int8 weights for inference (`--quantize int8`): the blocks' Linear layers and the head.

Why it is shaped this way:
- Decoding at batch 1 reads every weight once per token, so its speed is the weights' bytes over
  memory bandwidth: int8 weights are a quarter of fp32's bytes. Each output row (channel) gets its
  own scale, max |w| / 127; the activations, the residual stream and the logits stay fp32.
- The kernel for a few rows (decoding) is fbgemm's `quantized::linear_dynamic`, which PyTorch
  ships for x86: it rounds the activations to 8 bits too, one scale per call (per token at batch
  1; full 8-bit range, not the 7-bit "reduce_range" quantize_dynamic uses by default); each row
  is put on its own grid (`Int8Linear._fbgemm`), so a row's result does not depend on its batch.
  Of the int8 kernels PyTorch has, side by side at one row on the seed model's shapes (README,
  "int8 weights"), fbgemm was the fastest on the head (4.7x fp32 there; the head is half of a
  token's bytes) and the most faithful: its greedy tokens agreed with fp32's as often as
  weight-only int8 did, while `_weight_int8pack_mm` agreed half as often: its output is bf16, and
  rounding every layer's output to bf16 costs more than rounding its input to 8 bits.
- More rows (a prompt's prefill, `eval`, no-cache decoding) dequantize the weight to fp32 and run
  the GEMM: exactly weight-only numerics, no activation scale shared across unrelated rows, and
  at that size the GEMM's compute, not the weight's bytes, is what costs. Up to GEMV_ROWS rows
  (a batch of server requests) stay on fbgemm. Off x86 CPUs (no fbgemm) every call dequantizes:
  correct, not faster.
- The token embedding stays as it was: a lookup reads one row per token, not the table. With tied
  embeddings the head gets its own int8 copy of the table (a quarter of its fp32 bytes more).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinyllm.errors import UserError
from tinyllm.model.gpt import GPT
from tinyllm.model.linear import replace_linears

QUANTIZE_CHOICES = ("none", "int8")
# Up to this many rows per call fbgemm's int8 kernel; more, the dequantized fp32 GEMM.
GEMV_ROWS = 16


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """int8 values [N, K] and fp32 scales [N] with weight ~= values * scales[:, None]."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # [N]
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 rows and one fp32 scale per output row.

    The output has the input's dtype.
    """

    replaces_head = True  # as a GPT's head_proj, its own (rounded) weights: losses go through it too

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        q, scale = quantize_rows(weight)
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight_int8", q.to(weight.device))
        self.register_buffer("scale", scale.to(weight.device))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._packed = None  # fbgemm's prepacked weight, on x86 CPUs
        self._pin = torch.zeros(1, self.in_features)  # the row that pins fbgemm's range (_fbgemm)
        self._pin[0, :2] = torch.tensor([1.0, -1.0])
        if weight.device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines:
            with warnings.catch_warnings():  # PyTorch marks quantized tensors as deprecated; 2.13 has them
                warnings.simplefilter("ignore")
                zeros = torch.zeros(len(scale), dtype=torch.long)
                qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zeros, 0)
                self._packed = torch.ops.quantized.linear_prepack(qweight, None)  # bias after rescaling

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features).float()  # [M, K]
        if self._packed is not None and rows.shape[0] <= GEMV_ROWS:
            y = self._fbgemm(rows)
        else:
            y = F.linear(rows, self.dequantized(), self.bias)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _fbgemm(self, rows: Tensor) -> Tensor:
        """fbgemm's int8 GEMV with each row on its own 8-bit grid, [M, K] -> [M, N].

        fbgemm picks one activation grid per call from the input's min and max, which would tie a
        row's rounding to whatever else is in the batch (a server request's tokens to its
        neighbours'). Each row is divided by its own max |x| and one extra row [1, -1, 0..]
        pins the call's range to exactly [-1, 1]: every row's grid is then fixed, its result the
        same alone or in any batch. The extra row costs little: at a few rows the weight's bytes,
        not the rows, set the time.
        """
        peak = torch.linalg.vector_norm(rows, float("inf"), dim=1, keepdim=True).clamp_(min=1e-30)  # [M, 1]
        y = torch.ops.quantized.linear_dynamic(torch.cat([rows / peak, self._pin]), self._packed, False)
        # (Few small ops: at one row they are a noticeable share of an int8 token.)
        return y[:-1] * peak if self.bias is None else torch.addcmul(self.bias, y[:-1], peak)  # [M, N]

    def dequantized(self) -> Tensor:
        """The weight [N, K] the int8 values stand for, in fp32."""
        return self.weight_int8.float() * self.scale[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def quantize_model(model: GPT, mode: str) -> GPT:
    """Quantize `model` in place for inference as `mode` asks ("none" leaves it as it is)."""
    if mode not in QUANTIZE_CHOICES:
        raise UserError(f"quantize mode {mode!r}: choose one of {', '.join(QUANTIZE_CHOICES)}")
    if mode == "int8":
        quantize_int8(model)
    return model


@torch.no_grad()
def quantize_int8(model: GPT) -> GPT:
    """Replace every Linear layer of the blocks, and the head, with `Int8Linear` (in place).

    The result is for inference only (buffers, no parameters to train); the head computes the
    real vocabulary's logits, as the model's own head does.
    """
    replace_linears(model.blocks, lambda layer: Int8Linear(layer.weight, layer.bias))
    model.head_proj = Int8Linear(model.head_weight[: model.config.vocab_size])
    return model


def weight_bytes(model: GPT) -> int:
    """Bytes of weights a decoding step reads: the blocks', the final norm's and the head's (its
    real rows; int8 values and scales once quantized). Embedding lookups read one row each."""
    if model.head_proj is not None:
        head = list(model.head_proj.buffers())
    else:
        head = [model.head_weight[: model.config.vocab_size]]
    tensors = [*head, *model.blocks.parameters(), *model.blocks.buffers(), *model.ln_f.parameters()]
    return sum(t.numel() * t.element_size() for t in tensors)
