"""The flags that pick a trained model (--run, --checkpoint, --device), shared by the commands on a run.

Why it is its own module: `chat`, `eval`, `export` and `serve` all start by loading a run, and
one definition keeps their flags, help and error messages the same. Torch is imported only when
a model is loaded, so `--help` answers at once.
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


def load_run(args: argparse.Namespace, verb: str) -> tuple[GPT, Config, Path]:
    """The model (eval mode), its config and checkpoint path named by --checkpoint or --run."""
    if not args.run and not args.checkpoint:
        raise UserError(f"give --run RUN_DIR (or --checkpoint PATH) to {verb}")
    from tinyllm.train.checkpoint import load_model
    from tinyllm.train.device import pick_device

    name = getattr(args, "device", "cpu")
    try:
        device = pick_device(name)
    except UserError:  # its message names the training config key, not this flag
        raise UserError(f"--device {name}: this machine has no such device; use --device auto or cpu") from None
    return load_model(args.checkpoint or args.run, device)
