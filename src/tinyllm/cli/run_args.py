"""The flags that pick a trained model (--run, --checkpoint, --device, --quantize), shared by the
commands on a run.

Why it is its own module: `sample`, `chat`, `eval`, `export` and `serve` all start by loading a
run, and one definition keeps their flags, help and error messages the same. Torch is imported
only when a model is loaded, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from tinyllm.errors import UserError

if TYPE_CHECKING:
    from pathlib import Path

    from tinyllm.config import Config
    from tinyllm.model.gpt import GPT


def add_run_arguments(p: argparse.ArgumentParser, *, device: bool = True) -> None:
    p.add_argument("--run", metavar="RUN_DIR", help="a run directory made by `tinyllm train` (its newest checkpoint is used)")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="a checkpoint directory (RUN_DIR/checkpoints/step-N) instead of the run's newest")
    if device:
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                       help="where to run the model (default auto: CUDA, then MPS, then CPU)")


# tinyllm.inference.quantize.QUANTIZE_CHOICES, repeated so that --help needs no torch.
QUANTIZE_CHOICES = ("none", "int8")


def add_quantize_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", default="none", metavar="MODE",
                   help="none (default: the weights as trained) or int8: weight-only int8 for the Linear layers and "
                   "the head, about a quarter of the bytes to read per token, so faster decoding on CPU")


def check_quantize(mode: str) -> None:
    """A one-line error for a --quantize value no loader accepts."""
    if mode not in QUANTIZE_CHOICES:
        raise UserError(f"--quantize {mode}: choose one of {', '.join(QUANTIZE_CHOICES)}")


def load_run(args: argparse.Namespace, verb: str, *, decoding: bool = True) -> tuple[GPT, Config, Path]:
    """The model (eval mode), its config and checkpoint path named by --checkpoint or --run,
    quantized as --quantize asks (where the command has that flag). `decoding`: the weights are
    laid out for fast decoding (`tinyllm.inference.layout`); export wants them as trained."""
    if not args.run and not args.checkpoint:
        raise UserError(f"give --run RUN_DIR (or --checkpoint PATH) to {verb}")
    quantize = getattr(args, "quantize", "none")
    check_quantize(quantize)
    from tinyllm.inference.layout import decode_layout
    from tinyllm.inference.quantize import quantize_model
    from tinyllm.runtime.checkpoint import load_model
    from tinyllm.runtime.device import pick_device

    name = getattr(args, "device", "cpu")
    try:
        device = pick_device(name)
    except UserError:  # its message names the training config key, not this flag
        raise UserError(f"--device {name}: this machine has no such device; use --device auto or cpu") from None
    model, cfg, ckpt = load_model(args.checkpoint or args.run, device)
    model = quantize_model(model, quantize)
    return (decode_layout(model) if decoding else model), cfg, ckpt
