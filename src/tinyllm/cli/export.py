"""`tinyllm export`: write a trained run as a Hugging Face transformers model folder or a GGUF file.

Why it is shaped this way: the mappings, the weights and the tokenizer are `tinyllm.export`'s
`export_hf` and `export_gguf`, which refuse an option combination they cannot reproduce and an
--out in use; this module loads the run and says how to use what it wrote. One --dtype flag
serves both formats; each accepts its own spellings (GGUF's are llama.cpp's type names).
"""

from __future__ import annotations

import argparse

from tinyllm.cli.run_args import add_run_arguments, load_run
from tinyllm.errors import UserError

DTYPES = {"hf": ("fp32", "bf16", "fp16"), "gguf": ("f32", "f16", "q8_0")}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a trained run as a Hugging Face transformers folder or a GGUF file (llama.cpp)",
        description="Export RUN_DIR's newest checkpoint (or --checkpoint) to a folder that transformers' "
        "AutoModelForCausalLM and AutoTokenizer load offline (config.json, model.safetensors, tokenizer files). "
        "GPT-2-style models become GPT2LMHeadModel, RoPE models Llama, Qwen3, Arcee or Apertus. "
        "--format gguf writes one file for llama.cpp, Ollama and LM Studio instead (gpt2, llama, qwen3, "
        "arcee, apertus or starcoder2 architecture), tokenizer and ChatML template included.",
    )
    add_run_arguments(p, device=False)
    p.add_argument("--format", default="hf", choices=tuple(DTYPES),
                   help="hf: a transformers folder (default); gguf: one llama.cpp file")
    p.add_argument("--out", metavar="PATH", required=True,
                   help="hf: the folder to write (must not exist, or be empty); gguf: the file (must not exist)")
    p.add_argument("--dtype", help="weight precision: fp32 (default), bf16 or fp16 for hf; "
                   "f32 (default), f16 or q8_0 for gguf")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    dtype = args.dtype or DTYPES[args.format][0]
    if dtype not in DTYPES[args.format]:
        raise UserError(f"--dtype {dtype} is not a --format {args.format} precision: use one of "
                        f"{', '.join(DTYPES[args.format])}")
    if args.format == "gguf":
        return _run_gguf(args, dtype)
    from tinyllm.export import export_hf, hf_architecture  # torch: after --help

    model, _, ckpt = load_run(args, "export", decoding=False)
    try:
        out = export_hf(model, args.out, dtype=dtype)
    except OSError as e:  # export_hf writes a temporary folder and renames it: nothing half-written is left
        raise _unwritable(args.out, e) from None
    print(f"wrote {out}: {hf_architecture(model.config)}, {dtype}, from {ckpt}")
    print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}) "
          "(and AutoTokenizer for its ChatML tokenizer)")
    return 0


def _run_gguf(args: argparse.Namespace, dtype: str) -> int:
    from tinyllm.export.gguf import export_gguf, gguf_architecture  # torch: after --help

    model, _, ckpt = load_run(args, "export", decoding=False)
    ckpt_dir = ckpt.resolve()  # `--run .` names the run too, not "" (the name of ".")
    name = ckpt_dir.parent.parent.name if ckpt_dir.parent.name == "checkpoints" else ckpt_dir.name
    try:
        out = export_gguf(model, args.out, dtype=dtype, name=name)
    except OSError as e:  # written under a temporary name and renamed: nothing half-written is left
        raise _unwritable(args.out, e) from None
    print(f"wrote {out}: {gguf_architecture(model.config)}, {dtype}, from {ckpt}")
    print(f"run it with llama.cpp: llama-cli -m {out} (chat) or llama-server -m {out} (OpenAI-style API)")
    return 0


def _unwritable(out: str, e: OSError) -> UserError:
    return UserError(f"--out {out}: cannot write {e.filename or out} ({e.strerror or e}): pick another "
                     "--out, or free disk space or make its parent folder writable")
