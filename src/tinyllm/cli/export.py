"""`tinyllm export`: write a trained run as a Hugging Face transformers model folder.

Why it is shaped this way: the mapping to transformers classes, the weights and the tokenizer
files are `tinyllm.export.export_hf`, which refuses an option combination it cannot reproduce and
a folder that is not empty; this module loads the run and says how to use what it wrote.
"""

from __future__ import annotations

import argparse

from tinyllm.cli.run_args import add_run_arguments, load_run
from tinyllm.errors import UserError

DTYPES = ("fp32", "bf16", "fp16")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a trained run as a Hugging Face transformers model folder",
        description="Export RUN_DIR's newest checkpoint (or --checkpoint) to a folder that transformers' "
        "AutoModelForCausalLM and AutoTokenizer load offline (config.json, model.safetensors, tokenizer files). "
        "GPT-2-style models become GPT2LMHeadModel, RoPE models Llama, Qwen3, Arcee or Apertus.",
    )
    add_run_arguments(p, device=False)
    p.add_argument("--out", metavar="DIR", required=True, help="the folder to write (must not exist, or be empty)")
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help="weight precision in the folder (default fp32)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tinyllm.export import export_hf, hf_architecture  # torch: after --help

    model, _, ckpt = load_run(args, "export")
    try:
        out = export_hf(model, args.out, dtype=args.dtype)
    except OSError as e:  # export_hf writes a temporary folder and renames it: nothing half-written is left
        raise UserError(f"--out {args.out}: cannot write {e.filename or args.out} ({e.strerror or e}): pick another "
                        "--out, or free disk space or make its parent folder writable") from None
    print(f"wrote {out}: {hf_architecture(model.config)}, {args.dtype}, from {ckpt}")
    print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}) "
          "(and AutoTokenizer for its ChatML tokenizer)")
    return 0
