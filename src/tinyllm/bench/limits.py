"""The machine's limits: matmul FLOP/s on large square GEMMs and at a model's own GEMM shapes
(training), and the memory bandwidth a matrix-vector product reaches (decoding).

Why it is shaped this way:
- MFU divides a model's FLOP rate by a limit. Over the square limit (what the matmul library
  reaches on big square problems) it says how far training is from the hardware. But a small
  model cannot reach that: its vocabulary projection runs in 1024-row chunks against a 50k-wide
  weight, and attention is a batch of small [T, hd] x [hd, T] products, and those shapes run
  slower. The shape limit is the rate one training step's GEMMs would reach if each ran at its
  own measured speed and nothing else took time: total FLOPs / sum(FLOPs_i / rate_i), the
  FLOP-weighted harmonic mean. MFU over it says how much the rest (norms, softmax, the optimizer,
  memory traffic, framework overhead) costs.
- The GEMM list is read off the model itself (built on the meta device, so no memory), so every
  option switch (SwiGLU, untied head, ...) is counted as it is. Each Linear runs three products
  per step, with the layouts autograd uses: forward x @ W^T, input gradient dy @ W, weight
  gradient dy^T @ x. The head runs as the fused loss runs it, `DEFAULT_CHUNK_SIZE` rows at a time.
  Attention counts QK^T and AV forward and four products backward, as batched matmuls over
  batch x heads; the list's FLOPs add up to `GPT.flops_per_token()` per token (the tests hold it
  to that).
- Decoding one token at batch 1 multiplies a vector by every weight matrix: it reads each weight
  once and does 2 FLOPs per weight, so memory bandwidth, not FLOP/s, bounds it. Its limit is
  the rate a GEMV reads one matrix as large as all those weights together, in the decoding
  dtype: the same bytes per token, and the same luck with the caches (a shared L3 can hold part
  of a 200 MB working set: on a 2-core dev CPU 64 MB streamed ~1.8x faster than 256 MB).
- Each rate is the best of a few timed windows: other processes on a shared machine only ever
  slow a window down, so the fastest window is the closest to what the machine can do.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tinyllm.inference.layout import onednn
from tinyllm.model.gpt import GPT, GPTConfig
from tinyllm.model.loss import DEFAULT_CHUNK_SIZE
from tinyllm.runtime.device import synchronize

SQUARE_SIZE = 2048  # 17 GFLOP a product; 4096 ran within 2% of its rate on a 2-core CPU
SQUARE_SIZE_GPU = 8192  # a GPU needs a larger problem to reach its peak


@dataclass(frozen=True)
class Gemm:
    """One product shape of a training step: [batch x] [m, k] @ [k, n], `count` times per step.

    layout says which operand is stored transposed: "nn" neither, "nt" the right one
    (x @ W^T), "tn" the left one (dy^T @ x); it changes which kernel path the library takes.
    """

    name: str
    m: int
    k: int
    n: int
    layout: str = "nn"
    batch: int = 0  # 0: a plain 2-D product; else a batched one
    count: float = 1.0  # fractional for a last, shorter loss chunk

    @property
    def flops(self) -> float:
        """FLOPs of one product (multiply and add counted as 2)."""
        return 2.0 * max(self.batch, 1) * self.m * self.k * self.n

    @property
    def step_flops(self) -> float:
        return self.flops * self.count


def model_gemms(cfg: GPTConfig, batch: int, context: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[Gemm]:
    """The GEMMs of one forward + backward on a [batch, context] micro-batch, same shapes merged."""
    with torch.device("meta"):
        model = GPT(cfg)
    rows = batch * context
    found: list[Gemm] = []
    for name, module in model.blocks.named_modules():
        if isinstance(module, nn.Linear):
            out_f, in_f = module.weight.shape
            kind = name.split(".", 1)[1]  # "0.attn.c_attn" -> "attn.c_attn"
            found += [Gemm(f"{kind} forward", rows, in_f, out_f, "nt"),
                      Gemm(f"{kind} input grad", rows, out_f, in_f),
                      Gemm(f"{kind} weight grad", out_f, rows, in_f, "tn")]
    vocab, width = model.head_weight.shape
    chunk = min(chunk_size, rows)
    share = rows / chunk  # chunks per step, the last one possibly shorter
    found += [Gemm("head forward", chunk, width, vocab, "nt", count=share),
              Gemm("head input grad", chunk, vocab, width, count=share),
              Gemm("head weight grad", vocab, chunk, width, "tn", count=share)]
    heads, hd = cfg.n_head, cfg.head_dim
    for _ in range(cfg.n_layer):
        bh = batch * heads
        found += [Gemm("attention QK^T", context, hd, context, "nt", bh),  # forward
                  Gemm("attention PV", context, context, hd, "nn", bh),  # forward
                  Gemm("attention QK^T", context, hd, context, "nt", bh),  # dP = dO V^T
                  Gemm("attention PV", context, context, hd, "nn", bh),  # dQ = dS K
                  Gemm("attention P^T dO", context, context, hd, "tn", bh),  # dV = P^T dO
                  Gemm("attention P^T dO", context, context, hd, "tn", bh)]  # dK = dS^T Q
    return _merge(found)


def _merge(gemms: list[Gemm]) -> list[Gemm]:
    """Same shape and layout: one entry whose count is the sum (it is timed once)."""
    merged: dict[tuple, Gemm] = {}
    for g in gemms:
        key = (g.name, g.m, g.k, g.n, g.layout, g.batch)
        if key in merged:
            merged[key] = Gemm(g.name, g.m, g.k, g.n, g.layout, g.batch, merged[key].count + g.count)
        else:
            merged[key] = g
    return list(merged.values())


def _product(g: Gemm, dtype: torch.dtype, device: torch.device) -> Callable[[], None]:
    """A closure running g once into a preallocated output (allocation is not the GEMM's cost)."""
    lead = (g.batch,) if g.batch else ()
    left = torch.randn(*lead, *((g.k, g.m) if g.layout == "tn" else (g.m, g.k)), dtype=dtype, device=device)
    right = torch.randn(*lead, *((g.n, g.k) if g.layout == "nt" else (g.k, g.n)), dtype=dtype, device=device)
    if g.layout == "tn":
        left = left.transpose(-1, -2)
    if g.layout == "nt":
        right = right.transpose(-1, -2)
    out = torch.empty(*lead, g.m, g.n, dtype=dtype, device=device)
    op = torch.bmm if g.batch else torch.mm
    return lambda: op(left, right, out=out)


def gemm_rate(g: Gemm, dtype: torch.dtype, device: torch.device, *, window_s: float = 0.05, windows: int = 3) -> float:
    """FLOP/s of g: after one untimed call, the best of `windows` windows of >= window_s each."""
    return _best_rate(_product(g, dtype, device), g.flops, device, window_s, windows)


def _best_rate(run: Callable[[], None], work: float, device: torch.device, window_s: float, windows: int) -> float:
    """`work` per call of `run`, per second: after one untimed call, the best of `windows` windows."""
    run()
    synchronize(device)
    best = 0.0
    for _ in range(windows):
        calls, started = 0, time.perf_counter()
        while True:
            run()
            calls += 1
            synchronize(device)
            elapsed = time.perf_counter() - started
            if elapsed >= window_s:
                break
        best = max(best, calls * work / elapsed)
    return best


def square_size(device: torch.device) -> int:
    return SQUARE_SIZE_GPU if device.type in ("cuda", "mps") else SQUARE_SIZE


def square_limit(dtype: torch.dtype, device: torch.device, window_s: float = 1.0) -> float:
    """Sustained FLOP/s on large square products: the best of three windows of >= window_s."""
    size = square_size(device)
    return gemm_rate(Gemm("square", size, size, size), dtype, device, window_s=window_s)


@dataclass
class ShapeLimit:
    flops_per_s: float  # the FLOP-weighted limit over all the step's GEMMs
    rates: list[tuple[Gemm, float]]  # each shape's own FLOP/s

    def by_part(self) -> dict[str, dict[str, float]]:
        """The limit of each part of the model (blocks' Linears, head, attention) and its FLOP share."""
        total = sum(g.step_flops for g, _ in self.rates)
        parts: dict[str, list[tuple[Gemm, float]]] = {}
        for g, rate in self.rates:
            parts.setdefault(part_of(g), []).append((g, rate))
        return {name: {"flops_per_s": sum(g.step_flops for g, _ in rs) / sum(g.step_flops / r for g, r in rs),
                       "flop_share": sum(g.step_flops for g, _ in rs) / total}
                for name, rs in parts.items()}


def part_of(g: Gemm) -> str:
    """"head", "attention" or "linears" (the blocks' Linear layers)."""
    first = g.name.split()[0]
    return first if first in ("head", "attention") else "linears"


def shape_limit(gemms: list[Gemm], dtype: torch.dtype, device: torch.device) -> ShapeLimit:
    """The step's FLOPs over the time its GEMMs take at their measured rates."""
    return _harmonic([(g, gemm_rate(g, dtype, device)) for g in gemms])


def faster_of(a: ShapeLimit, b: ShapeLimit) -> ShapeLimit:
    """Two measurements of the same GEMMs combined: each shape at the faster of its two rates."""
    other = dict(b.rates)
    return _harmonic([(g, max(rate, other[g])) for g, rate in a.rates])


def _harmonic(rates: list[tuple[Gemm, float]]) -> ShapeLimit:
    flops = sum(g.step_flops for g, _ in rates)
    seconds = sum(g.step_flops / rate for g, rate in rates)
    return ShapeLimit(flops / seconds, rates)


def gemv_bandwidth(nbytes: int, dtype: torch.dtype, device: torch.device, *, window_s: float = 0.3,
                   windows: int = 3) -> float:
    """Bytes/s a matrix-vector product reads from an `nbytes` matrix: the best of `windows` windows of >= window_s,
    for the matrix stored row-major and column-major, and in fp32 on CPU packed for oneDNN, whichever
    reads fastest (on a Zen 4 with MKL, column-major read 21 GB/s against row-major's 15:
    `tinyllm.inference.layout`)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    cols = 1024
    rows = max(nbytes // itemsize // cols, 1)
    vector = torch.randn(cols, device=device).to(dtype)
    out = torch.empty(rows, dtype=dtype, device=device)

    def rate(matrix: torch.Tensor) -> float:
        return _best_rate(lambda: torch.mv(matrix, vector, out=out), rows * cols * itemsize, device, window_s, windows)

    row_major = rate(torch.randn(rows, cols, device=device).to(dtype))
    best = max(row_major, rate(torch.randn(cols, rows, device=device).to(dtype).t()))
    if dtype == torch.float32 and device.type == "cpu" and onednn():
        # oneDNN's product over a packed copy, as the blocks decode (tinyllm.inference.layout)
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.randn(rows, cols))
        row = vector[None]
        best = max(best, _best_rate(
            lambda: torch.ops.mkldnn._linear_pointwise(row, packed, None, "none", [], ""),
            rows * cols * itemsize, device, window_s, windows))
    return best
