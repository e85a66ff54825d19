"""Export a tinyllm GPT as one GGUF file that llama.cpp (and Ollama, LM Studio, llamafile) runs.

Why it is shaped this way:
- Each option combination maps to the llama.cpp architecture whose graph computes the same
  function, or to a UserError naming the option. Read from llama.cpp's `src/models/*.cpp` as
  vendored in llama-cpp-python 0.3.36, and checked by the tests against that runtime:

      learned + layernorm + gelu                  gpt2     (fused qkv, biases required)
      rope + layernorm + gelu                     starcoder2 (biases required)
      rope + rmsnorm + swiglu                     llama    (optional biases everywhere)
      rope + rmsnorm + swiglu + qk_norm           qwen3    (per-head RMSNorm before RoPE)
      rope + rmsnorm + relu2                      arcee    (Llama with a relu^2 MLP)
      rope + rmsnorm + relu2 + qk_norm            apertus  (qwen3's QK-norm, xIELU MLP)

  Apertus's xIELU is alpha_p*x^2 + beta*x for x > 0 and alpha_n*(expm1(min(x, eps)) - x) + beta*x
  otherwise, where ggml takes alpha_p = softplus(stored) and alpha_n = beta + softplus(stored):
  with beta = 0, alpha_p = softplus(log(e - 1)) = 1 and softplus(-1e4) = 0 (it underflows in
  float32) it is relu^2 exactly. Every other combination is refused (llama.cpp's gpt2 has GELU
  only; no RoPE arch has a GELU MLP with RMSNorm or QK-norm). gpt2 and starcoder2 require every
  bias and llama is the only RMSNorm arch that loads MLP and output biases, so a bias-free
  LayerNorm model gets zero biases.
- `model.doc_mask` changes no weight: it only keeps training rows' documents apart, and a prompt
  is one document (it starts with <|endoftext|>), so the exported model computes the same.
- RoPE layout: tinyllm rotates pairs (i, i + hd/2), llama.cpp's NEOX type (starcoder2, qwen3,
  apertus). llama
  and arcee use the NORM type, pairs (2i, 2i+1), so their q and k rows are permuted per head
  (what llama.cpp's convert_hf_to_gguf.py does for Llama checkpoints). QK-norm weights are never
  permuted: only NEOX targets have QK-norm.
- Weights as numpy arrays in [out, in] (ggml's {in, out}); only the real vocabulary rows are
  written. f16 and q8_0 convert the matrices; norm weights and biases stay f32 (as llama.cpp's
  converter does). q8_0 quantises in blocks of 32 along a row; a matrix whose rows are not a
  multiple of 32 is written in f16. ggml's CPU GELU reads a float16 table, so gpt2 files agree
  with tinyllm less closely than RoPE files even in f32 (README gives the measured tolerances).
- The tokenizer is GPT-2's byte-level BPE from the same two files tinyllm reads (encoder.json's
  token strings, vocab.bpe's merges), plus the three chat tokens at tinyllm's ids, all four
  special tokens marked CONTROL, so `llama_tokenize(..., parse_special=false)` keeps their text
  as plain text exactly like `Tokenizer.encode`. bos is `<|endoftext|>` and added to every
  prompt (`Tokenizer.prompt_ids`); eos and eot are `<|im_end|>`; llama.cpp also ends generation
  at `<|endoftext|>` by its name. tinyllm ends an answer at `<|im_start|>` too (the model opened
  the next message itself): that is the file's eom ("end of message"), the one other id llama.cpp
  stops at. `<|pad|>`, never a training target, is the only stop id llama.cpp does not know. The
  chat template is the Hugging Face export's, so llama.cpp's Jinja chat mode renders
  `Tokenizer.prompt_ids(messages=...)`'s text.
- The file is written under a temporary name beside `out` and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from tinyllm.errors import UserError
from tinyllm.export.hf_tokenizer import CHAT_TEMPLATE
from tinyllm.fsio import fsync_file, publish_new
from tinyllm.model.gpt import GPT, GPTConfig
from tinyllm.tokenizer import (
    EOT,
    IM_END,
    IM_START,
    PAD,
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    _gpt2_files,
    get_tokenizer,
)

GGUF_DTYPES = ("f32", "f16", "q8_0")
_Q8_BLOCK = 32
_RELU2_AS_XIELU = {"alpha_p": math.log(math.e - 1), "alpha_n": -1e4, "beta": 0.0, "eps": -1e-6}


@dataclass(frozen=True)
class _Target:
    """A llama.cpp architecture for a RoPE model: its name and what its graph allows."""

    arch: str
    interleaved_rope: bool  # LLAMA_ROPE_TYPE_NORM (pairs 2i, 2i+1) rather than NEOX
    biases: bool  # loads attention-output and MLP biases
    biases_required: bool = False  # every Linear and norm bias must be in the file
    output_required: bool = False  # no fallback to the embedding table for a tied head


_ROPE_TARGETS = {  # (norm, mlp, qk_norm) -> target
    ("layernorm", "gelu", False): _Target("starcoder2", False, True, biases_required=True),
    ("rmsnorm", "swiglu", False): _Target("llama", True, True),
    ("rmsnorm", "swiglu", True): _Target("qwen3", False, False),
    ("rmsnorm", "relu2", False): _Target("arcee", True, False),
    ("rmsnorm", "relu2", True): _Target("apertus", False, False, output_required=True),
}


def _rope_target(cfg: GPTConfig) -> _Target | None:
    return _ROPE_TARGETS.get((cfg.norm, cfg.mlp, cfg.qk_norm))


def gguf_architecture(config: GPTConfig) -> str:
    """The llama.cpp architecture an export of `config` runs as. UserError if none is faithful."""
    problems = _unexportable(config)
    if problems:
        raise UserError(
            "cannot export this model to GGUF: " + "; ".join(problems)
            + ". Exportable: layernorm + gelu with learned positions (gpt2) or rope (starcoder2), "
            "or rope + rmsnorm with mlp swiglu or relu2 (llama, qwen3, arcee, apertus)"
        )
    return "gpt2" if config.pos_emb == "learned" else _rope_target(config).arch


def _unexportable(cfg: GPTConfig) -> list[str]:
    problems = []
    if cfg.vocab_size != VOCAB_SIZE:
        problems.append(f"model.vocab_size={cfg.vocab_size}, but the file carries tinyllm's "
                        f"{VOCAB_SIZE}-token tokenizer")
    if cfg.pos_emb == "learned":
        if cfg.norm != "layernorm":
            problems.append(f"model.norm='{cfg.norm}' with pos_emb='learned' (llama.cpp's gpt2 uses LayerNorm)")
        if cfg.qk_norm:
            problems.append("model.qk_norm=true with pos_emb='learned' (llama.cpp's gpt2 has no QK-norm)")
        if cfg.mlp != "gelu":
            problems.append(f"model.mlp='{cfg.mlp}' with pos_emb='learned' (llama.cpp's gpt2 MLP is GELU)")
        return problems
    target = _rope_target(cfg)
    if target is None:
        qk = ", qk_norm=true" if cfg.qk_norm else ""
        problems.append(f"model.norm='{cfg.norm}', mlp='{cfg.mlp}'{qk} with pos_emb='rope' "
                        "(no llama.cpp RoPE architecture computes that block)")
    elif cfg.bias and not target.biases:
        problems.append(f"model.bias=true with norm='{cfg.norm}', mlp='{cfg.mlp}', "
                        f"qk_norm={str(cfg.qk_norm).lower()} "
                        f"(llama.cpp's {target.arch} loads no MLP or attention-output biases)")
    return problems


def export_gguf(model: GPT, out: str | Path, *, dtype: str = "f32", name: str = "tinyllm") -> Path:
    """Write `model` and tinyllm's tokenizer as one GGUF file at `out` (which must not exist).

    `dtype` is f32, f16 or q8_0 (for the matrices; see the module docstring). Returns `out`.
    """
    gguf = _import_gguf()
    arch = gguf_architecture(model.config)
    if dtype not in GGUF_DTYPES:
        raise UserError(f"GGUF dtype {dtype!r} is not supported: use one of {', '.join(GGUF_DTYPES)}")
    out = Path(out)
    if out.exists():
        raise UserError(f"--out {out} already exists: pick a new file name or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)  # as the hf export does for its folder
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # two exports at once write two files
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        _add_metadata(writer, gguf, model, arch, dtype, name)
        for tensor_name, tensor in _tensors(model, arch):
            _add_tensor(writer, gguf, tensor_name, tensor, dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        fsync_file(tmp)
        publish_new(tmp, out)
    except FileExistsError:
        tmp.unlink(missing_ok=True)
        raise UserError(f"--out {out} was made while the export ran: it is left as it is; pick another name") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _import_gguf():  # -> the gguf module
    try:
        import gguf
    except ImportError as e:
        raise UserError("export --format gguf needs the gguf package: pip install gguf") from e
    return gguf


# ---------------------------------------------------------------------------------------------
# Metadata: hyperparameters and the tokenizer


def _add_metadata(writer, gguf, model: GPT, arch: str, dtype: str, name: str) -> None:
    cfg = model.config
    writer.add_name(name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(model.blocks[0].mlp.c_proj.in_features)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_head)
    eps = _norm_eps(model)
    if cfg.norm == "layernorm":
        writer.add_layer_norm_eps(eps)
    else:
        writer.add_layer_norm_rms_eps(eps)
    if cfg.pos_emb == "rope":
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_rope_dimension_count(cfg.head_dim)
    if arch == "apertus":
        n = cfg.n_layer
        writer.add_xielu_alpha_p([_RELU2_AS_XIELU["alpha_p"]] * n)
        writer.add_xielu_alpha_n([_RELU2_AS_XIELU["alpha_n"]] * n)
        writer.add_xielu_beta([_RELU2_AS_XIELU["beta"]] * n)
        writer.add_xielu_eps([_RELU2_AS_XIELU["eps"]] * n)
    _add_tokenizer(writer, gguf)


def _add_tokenizer(writer, gguf) -> None:
    get_tokenizer()  # checks the GPT-2 files are the originals before we read them
    vocab_bpe, encoder_json = _gpt2_files()
    with open(encoder_json, encoding="utf-8") as f:
        encoder: dict[str, int] = json.load(f)
    tokens = sorted(encoder, key=encoder.get) + sorted(SPECIAL_TOKENS, key=SPECIAL_TOKENS.get)[1:]
    # <|endoftext|> is already encoder.json's last entry; the three chat tokens follow it.
    if tokens[EOT] != "<|endoftext|>" or len(tokens) != VOCAB_SIZE or \
            any(tokens[i] != t for t, i in SPECIAL_TOKENS.items()):
        raise RuntimeError("GPT-2's encoder.json does not give tinyllm's token ids")
    with open(vocab_bpe, encoding="utf-8") as f:
        merges = [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#version")]
    types = [gguf.TokenType.NORMAL] * VOCAB_SIZE
    for i in SPECIAL_TOKENS.values():
        types[i] = gguf.TokenType.CONTROL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(EOT)
    writer.add_eos_token_id(IM_END)
    writer.add_eot_token_id(IM_END)
    writer.add_eom_token_id(IM_START)
    writer.add_pad_token_id(PAD)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def _norm_eps(model: GPT) -> float:
    eps = {m.eps for m in model.modules() if isinstance(getattr(m, "eps", None), float)}
    assert len(eps) == 1, f"norms disagree on epsilon: {sorted(eps)}"
    return eps.pop()


# ---------------------------------------------------------------------------------------------
# Tensors


def _add_tensor(writer, gguf, name: str, tensor: Tensor, dtype: str) -> None:
    data = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    if data.ndim == 1 or dtype == "f32":
        writer.add_tensor(name, data)
    elif dtype == "q8_0" and data.shape[-1] % _Q8_BLOCK == 0:
        q8 = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data, q8), raw_dtype=q8)
    else:
        writer.add_tensor(name, data.astype(np.float16))


def _tensors(model: GPT, arch: str) -> Iterator[tuple[str, Tensor]]:
    """(GGUF tensor name, weight [out, in] or vector) for every tensor the arch loads."""
    V = model.config.vocab_size
    yield "token_embd.weight", model.wte.weight[:V]
    if arch == "gpt2":
        yield from _gpt2_tensors(model)
    else:
        yield from _rope_tensors(model, _rope_target(model.config))
    if model.lm_head is not None:
        yield "output.weight", model.lm_head.weight[:V]
    elif arch == "apertus":  # its head is required: repeat the tied table
        yield "output.weight", model.wte.weight[:V]


def _with_bias(name: str, weight: Tensor, bias: Tensor | None, required: bool) -> Iterator[tuple[str, Tensor]]:
    yield f"{name}.weight", weight
    if bias is None and required:  # zeros compute what a bias-free model does
        bias = weight.new_zeros(weight.shape[0])
    if bias is not None:
        yield f"{name}.bias", bias


def _gpt2_tensors(model: GPT) -> Iterator[tuple[str, Tensor]]:
    def part(name: str, m: nn.Module) -> Iterator[tuple[str, Tensor]]:
        return _with_bias(name, m.weight, m.bias, required=True)

    yield "position_embd.weight", model.wpe.weight
    for i, block in enumerate(model.blocks):
        yield from part(f"blk.{i}.attn_norm", block.ln_1)
        yield from part(f"blk.{i}.attn_qkv", block.attn.c_attn)
        yield from part(f"blk.{i}.attn_output", block.attn.c_proj)
        yield from part(f"blk.{i}.ffn_norm", block.ln_2)
        yield from part(f"blk.{i}.ffn_up", block.mlp.c_fc)
        yield from part(f"blk.{i}.ffn_down", block.mlp.c_proj)
    yield from part("output_norm", model.ln_f)


def _rope_tensors(model: GPT, target: _Target) -> Iterator[tuple[str, Tensor]]:
    n_head = model.config.n_head

    def split(m: nn.Linear, n: int) -> list[tuple[Tensor, Tensor | None]]:
        """m's weight and bias cut into n blocks of output rows."""
        biases = m.bias.chunk(n) if m.bias is not None else (None,) * n
        return list(zip(m.weight.chunk(n), biases, strict=True))

    def linear(name: str, weight: Tensor, bias: Tensor | None) -> Iterator[tuple[str, Tensor]]:
        return _with_bias(name, weight, bias, target.biases_required)

    def norm(name: str, m: nn.Module) -> Iterator[tuple[str, Tensor]]:
        return linear(name, m.weight, getattr(m, "bias", None))  # RMSNorm has no bias

    for i, block in enumerate(model.blocks):
        p, attn, mlp = f"blk.{i}", block.attn, block.mlp
        yield from norm(f"{p}.attn_norm", block.ln_1)
        for part, (w, b) in zip("qkv", split(attn.c_attn, 3), strict=True):
            if target.interleaved_rope and part in "qk":
                w, b = _interleave(w, n_head), None if b is None else _interleave(b, n_head)
            yield from linear(f"{p}.attn_{part}", w, b)
        yield from linear(f"{p}.attn_output", attn.c_proj.weight, attn.c_proj.bias)
        if attn.q_norm is not None:
            yield f"{p}.attn_q_norm.weight", attn.q_norm.weight
            yield f"{p}.attn_k_norm.weight", attn.k_norm.weight
        yield from norm(f"{p}.ffn_norm", block.ln_2)
        if mlp.kind == "swiglu":  # c_fc holds [gate; up]
            (gate_w, gate_b), (up_w, up_b) = split(mlp.c_fc, 2)
            yield from linear(f"{p}.ffn_gate", gate_w, gate_b)
            yield from linear(f"{p}.ffn_up", up_w, up_b)
        else:
            yield from linear(f"{p}.ffn_up", mlp.c_fc.weight, mlp.c_fc.bias)
        yield from linear(f"{p}.ffn_down", mlp.c_proj.weight, mlp.c_proj.bias)
    yield from norm("output_norm", model.ln_f)


def _interleave(rows: Tensor, n_head: int) -> Tensor:
    """Reorder each head's rows from tinyllm's RoPE pairs (j, j + hd/2) to adjacent (2j, 2j + 1).

    rows [n_head * hd, ...] -> same shape; row 2j + k of a head is its old row k * hd/2 + j.
    """
    shape = rows.shape
    hd = shape[0] // n_head
    return rows.reshape(n_head, 2, hd // 2, *shape[1:]).transpose(1, 2).reshape(shape)
