"""`tinyllm train`: resolve the config (preset -> --config -> flags), then run or continue a run."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import shlex
import traceback
from pathlib import Path

from tinyllm.config import DEFAULT_PRESET, list_presets, parse_set, time_budget
from tinyllm.errors import UserError

# Flags every user expects, each a shorthand for one config key.
_FLAG_KEYS = {
    "max_steps": "train.max_steps",
    "seed": "train.seed",
    "checkpoint_every": "train.checkpoint_every",
    "eval_every": "train.eval_every",
    "sample_every": "train.sample_every",
    "max_time": "train.max_time",
    "parallel": "train.parallel",
    "batch_tokens": "train.batch_tokens",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from scratch (default: the cpu preset on the built-in stories), or chat-fine-tune one",
        description="Train a GPT from scratch. The config is resolved as preset -> --config FILE.toml -> "
        "flags and saved to RUN_DIR/config.toml. Running again into a RUN_DIR that has checkpoints "
        "continues it exactly where it stopped. Ctrl-C or SIGTERM saves a checkpoint and stops (exit status 130). "
        "--stage sft --init RUN_DIR fine-tunes a pretrained run on chat data instead (config: that run's, "
        "then SFT defaults, then --config and flags).",
    )
    p.add_argument("--preset", help=f"starting recipe (default {DEFAULT_PRESET}); see --list-presets")
    p.add_argument("--list-presets", action="store_true", help="print the shipped presets and exit")
    p.add_argument("--config", metavar="FILE.toml", help="TOML file with [model] [data] [optim] [train] tables applied over the preset")
    p.add_argument("--stage", choices=("pretrain", "sft"),
                   help="pretrain (from random weights; the default) or sft: chat fine-tuning of the --init run with the "
                   "loss on assistant tokens only (default when continuing: the run's own stage)")
    p.add_argument("--init", metavar="RUN_DIR",
                   help="with --stage sft: the pretrained run (its newest checkpoint) or checkpoint to start from; its "
                   "model config is reused, optimizer state starts fresh")
    p.add_argument("--data", metavar="DIR", help="a dataset made by `tinyllm prepare` (default: the built-in corpus, prepared into a cache on first use)")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory for logs and checkpoints (default runs/PRESET-DATE-TIME)")
    p.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                   help="continue from RUN_DIR's newest checkpoint (an error if it has none), or from the given checkpoint directory")
    p.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps in total (train.max_steps)")
    p.add_argument("--max-time", metavar="DURATION",
                   help="wall-clock budget, e.g. 90s, 10m, 2h (none: no limit): the lr schedule follows the "
                   "time spent, reaching its floor as the budget ends, then the run stops with a checkpoint "
                   "(train.max_time)")
    p.add_argument("--seed", type=int, metavar="N", help="random seed for initialization and data order (train.seed)")
    p.add_argument("--checkpoint-every", type=int, metavar="N", help="save a checkpoint every N steps, 0 for only at the end (train.checkpoint_every)")
    p.add_argument("--eval-every", type=int, metavar="N", help="val loss every N steps, 0 for never (train.eval_every)")
    p.add_argument("--sample-every", type=int, metavar="N", help="print samples from the fixed prompts every N steps, 0 for never (train.sample_every)")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train with N processes on this machine (one per GPU; CPU processes share the cores): "
                   "plans the run, writes its config to RUN_DIR/config.toml and starts torchrun on it. "
                   "For several machines run torchrun yourself: "
                   "torchrun --nproc-per-node=N ... -m tinyllm train --out RUN_DIR ...")
    p.add_argument("--parallel", choices=("ddp", "fsdp"),
                   help="how torchrun processes share the model: ddp (each holds all of it; the default) or fsdp "
                   "(FSDP2 shards weights, gradients and optimizer state, for models too big for one device) (train.parallel)")
    p.add_argument("--batch-tokens", type=int, metavar="N",
                   help="tokens per optimizer step over all processes; grad_accum follows from it, so the step is the "
                   "same with any number of processes (train.batch_tokens; 0: micro_batch x grad_accum x processes x model.block_size)")
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
    from tinyllm.runtime.device import keep_freed_memory, pick_device
    from tinyllm.runtime.run_dir import held_for_training
    from tinyllm.train import distributed, launch
    from tinyllm.train.run_plan import plan_run
    from tinyllm.train.trainer import Trainer

    if distributed.launched() and args.out is None and args.resume is None:
        raise UserError("under torchrun every process must write to the same run: add --out RUN_DIR")
    processes = launch.check_nproc(args.nproc) if args.nproc is not None else distributed.env_world_size()
    plan = plan_run(args.out, preset=args.preset, config_file=args.config, overrides=overrides_from_args(args),
                    resume=args.resume, stage=args.stage, init=args.init, processes=processes)
    if args.nproc is not None:  # planned here, so a mistake is one line, not one per process
        if plan.note and plan.resume_from is None:  # a new run's width: its processes read it chosen
            print(plan.note, flush=True)
        return launch.launch(args.nproc, plan)
    if plan.note and distributed.env_rank() == 0:  # after the launch: its rank 0 says it, once
        print(plan.note, flush=True)
    if pick_device(plan.config.train.device).type == "cpu":
        keep_freed_memory()  # process-wide, so set here, where the process is ours (train.device)
    # Rank 0 holds the run directory for all the processes of one run (they share it by design):
    # before the trainer touches it, or, a new one, once the trainer has made it.
    rank0, existed = distributed.env_rank() == 0, plan.run_dir.is_dir()
    with contextlib.ExitStack() as held:
        trainer = None
        try:
            if rank0 and existed:
                held.enter_context(held_for_training(plan.run_dir))
            trainer = Trainer(plan.config, plan.run_dir, resume_from=plan.resume_from)
            if rank0 and not existed:
                held.enter_context(held_for_training(plan.run_dir))
            result = trainer.run()
        except BaseException as e:
            traceback.clear_frames(e.__traceback__)  # the failed calls' frames hold the trainer too
            raise
        finally:
            # The trainer goes first: DDP's reducer holds gloo's process group, and were it the last
            # to let go, after teardown, gloo's destructor would wait, holding the GIL, for a thread
            # that needs the GIL to drop its last work (a worker hung at exit, ~1 run in 2).
            del trainer
            distributed.teardown()
    if distributed.env_rank() == 0:
        t = plan.config.train
        print(summary(result, time_budget(t) if t.budget_drives_schedule else None))
    # 130, as a shell gives a command Ctrl-C stopped, so `tinyllm train && tinyllm train --stage sft`
    # does not go on after it; under torchrun the launcher gives the status (a worker's 130 is a failure to it).
    return 130 if result.stopped == "interrupted" and not distributed.launched() else 0


def summary(result, budget: float | None = None) -> str:
    """What the run did, where it is, and what to try next on it (`budget`: train.max_time in seconds)."""
    minutes, seconds = divmod(int(result.seconds), 60)
    run = shlex.quote(str(result.run_dir))
    lines = [
        "",
        f"{result.stopped}: {result.steps:,} steps, {result.tokens:,} tokens in {minutes}m{seconds:02d}s "
        f"({result.tokens / max(result.seconds, 1e-9):,.0f} tokens/s overall)",
    ]
    if result.val_loss is not None:
        line = f"final val loss {result.val_loss:.4f} nats/token"
        if result.val_bpb is not None:
            line += f" ({result.val_bpb:.4f} bits/byte)"
        if result.floor is not None:
            line += f" | corpus floor {result.floor:.4f} | gap {result.val_loss - result.floor:.4f}"
        lines.append(line)
        if result.floor is not None and result.val_rows and result.val_rows[0] < result.val_rows[1]:
            scored, rows = result.val_rows
            lines.append(f"  (the val loss is over {scored:,} of the val split's {rows:,} rows (train.eval_batches), "
                         f"the floor over all of them: `tinyllm eval --run {run}` gives the whole split's gap)")
    if result.qa_accuracy is not None:
        lines.append(f"held-out QA: {result.qa_accuracy:.1%} exact answers")
    lines += [f"run directory: {result.run_dir} (loss.png, train_output.txt, metrics.jsonl, checkpoints/)", "try next:"]
    lines.append(f"  tinyllm sample --run {run} --prompt 'Once upon a time'")
    for name, usage in (("chat", f"tinyllm chat --run {run}"), ("eval", f"tinyllm eval --run {run}")):
        if importlib.util.find_spec(f"tinyllm.cli.{name}") is not None:
            lines.append(f"  {usage}")
    if result.stopped == "interrupted":  # its config is in its checkpoint: the same run goes on
        lines.append(f"  tinyllm train --out {run}   # continue where it stopped")
    elif result.stopped == "time budget" and budget:  # the seconds spent are the run's: a longer budget goes on
        lines.append(f"  tinyllm train --out {run} --max-time {2 * budget:g}s   # continue training")
    else:
        lines.append(f"  tinyllm train --out {run} --max-steps {result.steps * 2}   # continue training")
    if result.qa_accuracy is None:
        lines.append(f"  tinyllm train --stage sft --init {run}   # chat fine-tuning")
    lines.append(f"  tensorboard --logdir {shlex.quote(str(result.run_dir / 'tb'))}")
    return "\n".join(lines)
