"""Export a tinyllm GPT as a Hugging Face transformers model folder.

Why it is shaped this way:
- Each option combination maps to the transformers architecture that computes the same function,
  or to a UserError naming the option. Checked against transformers 5's modeling code, and by the
  tests' logit comparison:

      learned + layernorm + gelu | relu2          GPT2LMHeadModel
      rope + rmsnorm + swiglu                     LlamaForCausalLM
      rope + rmsnorm + swiglu + qk_norm           Qwen3ForCausalLM   (per-head RMSNorm, before RoPE)
      rope + rmsnorm + gelu | relu2               ArceeForCausalLM   (Llama with a non-gated MLP)
      rope + rmsnorm + gelu | relu2 + qk_norm     ApertusForCausalLM (Arcee plus Qwen3's QK-norm)

  GELU is the tanh approximation, exported as `gelu_pytorch_tanh` (the same op, not `gelu_new`'s
  re-implementation). GPT-2 always has biases, so a bias-free model is written with zero biases;
  Llama and Arcee switch theirs with `attention_bias` / `mlp_bias`; Qwen3's and Apertus's MLPs
  have none, so bias=true with qk_norm is refused. rope + layernorm has no target.
- RoPE needs no weight permutation: tinyllm rotates pairs (i, i + hd/2), the half-split layout of
  transformers' `rotate_half`, and both keep each head's hd rows contiguous. GPT-2's Conv1D stores
  weights [in, out], so those are transposed. The fused c_attn splits into q, k, v and SwiGLU's
  c_fc into [gate; up] by rows.
- Only the real vocabulary rows are written: tinyllm never emits a padded id, and without those
  rows transformers cannot generate one either.
- The name map is checked against the key names and shapes of the transformers class built on the
  meta device (no memory, no init), so drift in the installed transformers fails the export rather
  than the later load. The folder is written under a temporary name, then renamed into place.
- `model.doc_mask` changes no weight: it only keeps training rows' documents apart, and a prompt
  is one document (it starts with <|endoftext|>), so the exported model computes the same.
- Logits agree up to block_size tokens (`max_position_embeddings`). Beyond it tinyllm's sampler
  re-encodes a shifted window; transformers' RoPE models keep counting and GPT-2 cannot go on.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor, nn

from tinyllm.errors import UserError
from tinyllm.export.hf_tokenizer import write_hf_tokenizer
from tinyllm.fsio import os_error_in
from tinyllm.model.gpt import GPT, GPTConfig
from tinyllm.tokenizer import EOT, IM_END, PAD, STOP_IDS, VOCAB_SIZE

GPT2_ARCHITECTURE = "GPT2LMHeadModel"
_ACTIVATIONS = {"gelu": "gelu_pytorch_tanh", "relu2": "relu2", "swiglu": "silu"}
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


@dataclass(frozen=True)
class _RopeTarget:
    """A Llama-family architecture: names and switches that differ between members."""

    architecture: str
    gated_mlp: bool  # down(act(gate(x)) * up(x)) rather than down(act(up(x)))
    qk_norm: bool
    has_mlp_bias: bool  # the config has an `mlp_bias` switch
    norm_names: tuple[str, str] = ("input_layernorm", "post_attention_layernorm")


_ROPE_TARGETS = {  # (gated MLP, qk_norm) -> target
    (True, False): _RopeTarget("LlamaForCausalLM", True, False, True),
    (True, True): _RopeTarget("Qwen3ForCausalLM", True, True, False),
    (False, False): _RopeTarget("ArceeForCausalLM", False, False, True),
    (False, True): _RopeTarget("ApertusForCausalLM", False, True, False,
                               ("attention_layernorm", "feedforward_layernorm")),
}


def hf_architecture(config: GPTConfig) -> str:
    """The transformers class an export of `config` loads as. UserError if none is faithful."""
    problems = _unexportable(config)
    if problems:
        raise UserError(
            "cannot export this model to transformers: " + "; ".join(problems)
            + ". Exportable: learned positions + layernorm + gelu|relu2 (GPT-2), "
            "or rope + rmsnorm with any MLP (Llama, Qwen3, Arcee, Apertus)"
        )
    if config.pos_emb == "learned":
        return GPT2_ARCHITECTURE
    return _rope_target(config).architecture


def _unexportable(cfg: GPTConfig) -> list[str]:
    problems = []
    if cfg.vocab_size != VOCAB_SIZE:
        problems.append(f"model.vocab_size={cfg.vocab_size}, but the export ships tinyllm's "
                        f"{VOCAB_SIZE}-token tokenizer")
    if cfg.pos_emb == "learned":
        if cfg.norm != "layernorm":
            problems.append(f"model.norm='{cfg.norm}' with pos_emb='learned' (GPT-2 uses LayerNorm)")
        if cfg.qk_norm:
            problems.append("model.qk_norm=true with pos_emb='learned' (GPT-2 has no QK-norm)")
        if cfg.mlp == "swiglu":
            problems.append("model.mlp='swiglu' with pos_emb='learned' (GPT-2's MLP is not gated)")
        return problems
    if cfg.norm != "rmsnorm":
        problems.append(f"model.norm='{cfg.norm}' with pos_emb='rope' (the Llama family uses RMSNorm)")
    elif cfg.bias and cfg.qk_norm:
        name = _rope_target(cfg).architecture.removesuffix("ForCausalLM")
        problems.append(f"model.bias=true with qk_norm=true and mlp='{cfg.mlp}' ({name} has no MLP biases)")
    return problems


def _rope_target(cfg: GPTConfig) -> _RopeTarget:
    return _ROPE_TARGETS[(cfg.mlp == "swiglu", cfg.qk_norm)]


def export_hf(model: GPT, out_dir: Path, *, dtype: torch.dtype | str = torch.float32) -> Path:
    """Write a folder that `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` load offline.

    Writes config.json, generation_config.json, model.safetensors (weights in `dtype`: float32,
    bfloat16 or float16) and the tokenizer files. `out_dir` must not exist or be empty. Returns
    `out_dir`.
    """
    cfg = model.config
    architecture = hf_architecture(cfg)
    dtype = _resolve_dtype(dtype)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"export folder {out_dir} already exists and is not empty: "
                        "choose a new path or remove it")
    transformers = _import_transformers()
    model_cls = getattr(transformers, architecture, None)
    if model_cls is None:
        raise UserError(f"transformers {transformers.__version__} has no {architecture}: "
                        "pip install -U 'transformers>=5'")

    if architecture == GPT2_ARCHITECTURE:
        hf_config, tensors = _gpt2_config(model_cls, model), _gpt2_tensors(model)
    else:
        target = _rope_target(cfg)
        hf_config, tensors = _rope_config(model_cls, target, model), _rope_tensors(model, target)
    _check_names(model_cls, hf_config, tensors)
    hf_config.architectures = [architecture]
    hf_config.dtype = dtype

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A plain mkdir, not tempfile.mkdtemp: mkdtemp's 0700 would survive the rename and keep
    # everyone but the exporting user out of the model.
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        contiguous = {k: v.detach().to("cpu", dtype).clone(memory_format=torch.contiguous_format)
                      for k, v in tensors.items()}
        _save_weights(contiguous, tmp / "model.safetensors")
        hf_config.save_pretrained(str(tmp))
        # tinyllm starts a prompt with <|endoftext|> and stops at any special id (STOP_IDS).
        transformers.GenerationConfig(**_special_ids()).save_pretrained(str(tmp))
        write_hf_tokenizer(tmp, model_max_length=cfg.block_size)
        _open_up(tmp, like=out_dir if out_dir.exists() else None)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _save_weights(tensors: dict[str, Tensor], path: Path) -> None:
    """safetensors' save_file, its I/O errors as OSError: a full disk is then the command's one-line
    error, not a SafetensorError traceback."""
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as e:
        if (error := os_error_in(e)) is None:
            raise
        raise error from e


def _open_up(folder: Path, like: Path | None) -> None:
    """Give `folder`'s files the mode a plain open() would (safetensors writes its file 0600), and
    `folder` the mode of the empty folder `like` it replaces, so the export is as readable as
    anything else the user writes there."""
    made = folder.stat().st_mode & 0o777  # mkdir's 0777 less the umask
    for f in folder.iterdir():
        f.chmod(made & 0o666)
    if like is not None:
        folder.chmod(like.stat().st_mode & 0o7777)


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise UserError(f"export dtype {dtype!r} is not supported: use one of {', '.join(_DTYPES)}")


def _import_transformers():  # -> the transformers module
    try:
        import transformers
    except ImportError as e:
        raise UserError("export needs transformers: pip install 'transformers>=5' tokenizers") from e
    return transformers


def _norm_eps(model: GPT) -> float:
    """The one epsilon every norm in the model uses (transformers configs have a single one)."""
    eps = {m.eps for m in model.modules() if isinstance(getattr(m, "eps", None), float)}
    assert len(eps) == 1, f"norms disagree on epsilon: {sorted(eps)}"
    return eps.pop()


def _special_ids() -> dict:
    # <|im_end|> first: transformers takes the first eos as "the" eos where it needs one.
    eos = [IM_END, *sorted(STOP_IDS - {IM_END})]
    return {"bos_token_id": EOT, "eos_token_id": eos, "pad_token_id": PAD}


# ---------------------------------------------------------------------------------------------
# GPT-2


def _gpt2_config(model_cls: type, model: GPT):
    cfg = model.config
    return model_cls.config_class(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=model.blocks[0].mlp.c_fc.out_features,
        activation_function=_ACTIVATIONS[cfg.mlp], layer_norm_epsilon=_norm_eps(model),
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        tie_word_embeddings=cfg.tie_embeddings, **_special_ids(),
    )


def _gpt2_tensors(model: GPT) -> dict[str, Tensor]:
    V = model.config.vocab_size
    out: dict[str, Tensor] = {"transformer.wte.weight": model.wte.weight[:V],
                              "transformer.wpe.weight": model.wpe.weight}

    def norm(name: str, m: nn.Module) -> None:
        out[f"{name}.weight"] = m.weight
        out[f"{name}.bias"] = m.bias if m.bias is not None else torch.zeros_like(m.weight)

    def conv1d(name: str, m: nn.Linear) -> None:
        out[f"{name}.weight"] = m.weight.t()  # Conv1D: [in, out]
        out[f"{name}.bias"] = m.bias if m.bias is not None else m.weight.new_zeros(m.out_features)

    for i, block in enumerate(model.blocks):
        p = f"transformer.h.{i}"
        norm(f"{p}.ln_1", block.ln_1)
        conv1d(f"{p}.attn.c_attn", block.attn.c_attn)
        conv1d(f"{p}.attn.c_proj", block.attn.c_proj)
        norm(f"{p}.ln_2", block.ln_2)
        conv1d(f"{p}.mlp.c_fc", block.mlp.c_fc)
        conv1d(f"{p}.mlp.c_proj", block.mlp.c_proj)
    norm("transformer.ln_f", model.ln_f)
    if model.lm_head is not None:
        out["lm_head.weight"] = model.lm_head.weight[:V]
    return out


# ---------------------------------------------------------------------------------------------
# The Llama family


def _rope_config(model_cls: type, target: _RopeTarget, model: GPT):
    cfg = model.config
    kwargs = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd,
        intermediate_size=model.blocks[0].mlp.c_proj.in_features,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head, head_dim=cfg.head_dim, hidden_act=_ACTIVATIONS[cfg.mlp],
        max_position_embeddings=cfg.block_size, rms_norm_eps=_norm_eps(model),
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=cfg.bias, attention_dropout=cfg.dropout,
        tie_word_embeddings=cfg.tie_embeddings, **_special_ids(),
    )
    if target.has_mlp_bias:
        kwargs["mlp_bias"] = cfg.bias
    return model_cls.config_class(**kwargs)


def _rope_tensors(model: GPT, target: _RopeTarget) -> dict[str, Tensor]:
    V = model.config.vocab_size
    out: dict[str, Tensor] = {"model.embed_tokens.weight": model.wte.weight[:V]}

    def linear(name: str, weight: Tensor, bias: Tensor | None) -> None:
        out[f"{name}.weight"] = weight
        if bias is not None:
            out[f"{name}.bias"] = bias

    def split(m: nn.Linear, n: int) -> list[tuple[Tensor, Tensor | None]]:
        """m's weight and bias cut into n blocks of output rows."""
        biases = m.bias.chunk(n) if m.bias is not None else (None,) * n
        return list(zip(m.weight.chunk(n), biases, strict=True))

    pre_attn, pre_mlp = target.norm_names
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}"
        attn, mlp = block.attn, block.mlp
        out[f"{p}.{pre_attn}.weight"] = block.ln_1.weight
        out[f"{p}.{pre_mlp}.weight"] = block.ln_2.weight
        for name, (w, b) in zip("qkv", split(attn.c_attn, 3), strict=True):
            linear(f"{p}.self_attn.{name}_proj", w, b)
        linear(f"{p}.self_attn.o_proj", attn.c_proj.weight, attn.c_proj.bias)
        if target.qk_norm:
            out[f"{p}.self_attn.q_norm.weight"] = attn.q_norm.weight
            out[f"{p}.self_attn.k_norm.weight"] = attn.k_norm.weight
        if target.gated_mlp:
            (gate_w, gate_b), (up_w, up_b) = split(mlp.c_fc, 2)
            linear(f"{p}.mlp.gate_proj", gate_w, gate_b)
            linear(f"{p}.mlp.up_proj", up_w, up_b)
        else:
            linear(f"{p}.mlp.up_proj", mlp.c_fc.weight, mlp.c_fc.bias)
        linear(f"{p}.mlp.down_proj", mlp.c_proj.weight, mlp.c_proj.bias)
    out["model.norm.weight"] = model.ln_f.weight
    if model.lm_head is not None:
        out["lm_head.weight"] = model.lm_head.weight[:V]
    return out


def _check_names(model_cls: type, hf_config, tensors: dict[str, Tensor]) -> None:
    """Fail unless `tensors` has exactly the names and shapes `model_cls` loads."""
    with torch.device("meta"):
        reference = model_cls(hf_config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    if hf_config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)  # transformers re-ties it on load
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        missing = sorted(expected.keys() - got.keys())
        extra = sorted(got.keys() - expected.keys())
        shapes = sorted(k for k in got.keys() & expected.keys() if got[k] != expected[k])
        raise RuntimeError(f"the {model_cls.__name__} export map is out of step with this transformers: "
                           f"missing {missing[:5]}, unexpected {extra[:5]}, wrong shape {shapes[:5]}")
