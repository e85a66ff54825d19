"""`tinyllm train`: resolve the config (preset -> --config -> flags), then run or continue a run."""

from __future__ import annotations

import argparse
import importlib.util
import shlex
from pathlib import Path

from tinyllm.config import DEFAULT_PRESET, list_presets, parse_set

# Flags every user expects, each a shorthand for one config key.
_FLAG_KEYS = {
    "max_steps": "train.max_steps",
    "seed": "train.seed",
    "checkpoint_every": "train.checkpoint_every",
    "eval_every": "train.eval_every",
    "sample_every": "train.sample_every",
    "max_time": "train.max_time",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from scratch (default: the cpu preset on the built-in stories)",
        description="Train a GPT from scratch. The config is resolved as preset -> --config FILE.toml -> "
        "flags and saved to RUN_DIR/config.toml. Running again into a RUN_DIR that has checkpoints "
        "continues it exactly where it stopped. Ctrl-C saves a checkpoint and stops.",
    )
    p.add_argument("--preset", help=f"starting recipe (default {DEFAULT_PRESET}); see --list-presets")
    p.add_argument("--list-presets", action="store_true", help="print the shipped presets and exit")
    p.add_argument("--config", metavar="FILE.toml", help="TOML file with [model] [data] [optim] [train] tables applied over the preset")
    p.add_argument("--data", metavar="DIR", help="a dataset made by `tinyllm prepare` (default: the built-in corpus, prepared into a cache on first use)")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory for logs and checkpoints (default runs/PRESET-DATE-TIME)")
    p.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                   help="continue from RUN_DIR's newest checkpoint (an error if it has none), or from the given checkpoint directory")
    p.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps in total (train.max_steps)")
    p.add_argument("--max-time", metavar="DURATION", help="wall-clock budget, e.g. 90s, 10m, 2h (none: no limit): stop with a checkpoint when it is spent (train.max_time)")
    p.add_argument("--seed", type=int, metavar="N", help="random seed for initialization and data order (train.seed)")
    p.add_argument("--checkpoint-every", type=int, metavar="N", help="save a checkpoint every N steps, 0 for only at the end (train.checkpoint_every)")
    p.add_argument("--eval-every", type=int, metavar="N", help="val loss every N steps, 0 for never (train.eval_every)")
    p.add_argument("--sample-every", type=int, metavar="N", help="print samples from the fixed prompts every N steps, 0 for never (train.sample_every)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="set any config key, e.g. --set optim.lr=1e-3 --set model.n_layer=6 (repeatable; values are TOML)")
    p.set_defaults(func=run)


def overrides_from_args(args: argparse.Namespace) -> list[tuple[str, object, str]]:
    """The config overrides the flags ask for, in the order they apply (named flags, then --set)."""
    out: list[tuple[str, object, str]] = []
    if args.data is not None:
        out.append(("data.dir", str(Path(args.data).resolve()), "--data"))
    for attr, key in _FLAG_KEYS.items():
        value = getattr(args, attr)
        if value is not None:
            out.append((key, value, "--" + attr.replace("_", "-")))
    for item in args.set:
        key, value = parse_set(item)
        out.append((key, value, f"--set {item}"))
    return out


def run(args: argparse.Namespace) -> int:
    if args.list_presets:
        for name, description in list_presets():
            print(f"{name:8s} {description}")
        return 0
    # Imported here so --help and --list-presets answer at once, without torch.
    from tinyllm.train.run_dir import plan_run
    from tinyllm.train.trainer import Trainer

    plan = plan_run(args.out, preset=args.preset, config_file=args.config, overrides=overrides_from_args(args),
                    resume=args.resume)
    result = Trainer(plan.config, plan.run_dir, resume_from=plan.resume_from).run()
    print(summary(result))
    return 0


def summary(result) -> str:
    """What the run did, where it is, and what to try next on it."""
    minutes, seconds = divmod(int(result.seconds), 60)
    run = shlex.quote(str(result.run_dir))
    lines = [
        "",
        f"{result.stopped}: {result.steps:,} steps, {result.tokens:,} tokens in {minutes}m{seconds:02d}s "
        f"({result.tokens / max(result.seconds, 1e-9):,.0f} tokens/s overall)",
    ]
    if result.val_loss is not None:
        line = f"final val loss {result.val_loss:.4f} nats/token"
        if result.floor is not None:
            line += f" | corpus floor {result.floor:.4f} | gap {result.val_loss - result.floor:.4f}"
        lines.append(line)
    lines += [f"run directory: {result.run_dir} (loss.png, train_output.txt, metrics.jsonl, checkpoints/)", "try next:"]
    lines.append(f"  tinyllm sample --run {run} --prompt 'Once upon a time'")
    for name, usage in (("chat", f"tinyllm chat --run {run}"), ("eval", f"tinyllm eval --run {run}")):
        if importlib.util.find_spec(f"tinyllm.cli.{name}") is not None:
            lines.append(f"  {usage}")
    lines.append(f"  tinyllm train --out {run} --max-steps {result.steps * 2}   # continue training")
    lines.append(f"  tensorboard --logdir {shlex.quote(str(result.run_dir / 'tb'))}")
    return "\n".join(lines)
