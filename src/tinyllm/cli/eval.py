"""`tinyllm eval`: held-out loss, perplexity and bits per byte of a trained run (and, with --qa,
exact-answer accuracy on the built-in corpus's held-out questions).

Why it is shaped this way: the figures are `tinyllm.eval` (`evaluate_loss`, `qa_accuracy`); this
module only finds the data and prints. By default it reads the data the run was trained on, found
the way the trainer finds it (`tinyllm.data.dataset`: the config's data.dir, else the built-in
corpus prepared into the cache with the run's data.builtin_tokens), and cuts and scores rows as the
run did (its model.block_size, data.mode, data.loss_on and train.micro_batch), so `--max-batches train.eval_batches` scores the
very rows of the trainer's periodic val loss. --qa always asks the sampled corpus's questions (`qa_dataset`), also of
a chat fine-tuning that read every question of every story, so runs compare. Each source of a mix is scored on its own rows, each
once, and reported on its own line; the total is over all their tokens (`tinyllm.eval.loss`). The
model runs in fp32 whatever precision it trained in.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tinyllm.cli.run_args import add_quantize_argument, add_run_arguments, load_run
from tinyllm.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="held-out loss, perplexity and bits per byte of a trained run",
        description="Score RUN_DIR's newest checkpoint (or --checkpoint) on a prepared split: loss in nats per "
        "token, perplexity, bits per byte and tokens scored; on the built-in corpus also its entropy floor and "
        "the gap to it. Rows are cut as in training (the run's model.block_size, data mode and micro-batch).",
    )
    add_run_arguments(p)
    add_quantize_argument(p)
    p.add_argument("--data", metavar="DIR", help="a dataset made by `tinyllm prepare` (default: the data the run was "
                   "trained on: its data.dir, or the built-in corpus, prepared again if the cache is gone)")
    p.add_argument("--split", default="val", choices=["train", "val"], help="which split to score (default val)")
    p.add_argument("--max-batches", type=int, metavar="N", help="score only N batches' worth of rows, shared among "
                   "the sources by size, each its first rows (default: every row once); the trainer's logged val "
                   "loss is N = train.eval_batches")
    p.add_argument("--batch-size", type=int, metavar="B", help="rows per batch (default: the run's train.micro_batch)")
    p.add_argument("--loss-on", choices=["all", "assistant"],
                   help="score every token, or only the assistant's tokens of chat data (default: as the run trained)")
    p.add_argument("--qa", type=int, default=0, metavar="N", help="also ask N held-out questions of the built-in "
                   "corpus, answered greedily, and report the share answered exactly (default 0: none)")
    p.add_argument("--task", action="append", metavar="NAME[=PATH]", help="instead of the loss, score a multiple-choice "
                   "task as lm-evaluation-harness does (acc, acc_norm): hellaswag or arc_easy from the Hugging Face hub, "
                   "or =PATH a local JSON-lines/parquet file in that dataset's schema; mc=PATH your own task, one "
                   '{"context": ..., "choices": [...], "gold": INDEX} per line. Repeatable')
    p.add_argument("--max-items", type=int, metavar="N", help="with --task: score only each task's first N items")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for flag in ("max_batches", "batch_size", "max_items"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.qa < 0:
        raise UserError(f"--qa must be >= 0, got {args.qa}")
    check_mode_flags(args)
    if args.task:
        return run_tasks(args)
    from tinyllm.data.dataset import qa_dataset, trained_dataset
    from tinyllm.eval import evaluate_loss, qa_accuracy  # torch: after --help
    from tinyllm.eval.qa import held_out_documents

    model, cfg, ckpt = load_run(args, "evaluate")
    data_dir = Path(args.data) if args.data else trained_dataset(cfg.data)
    questions = None  # their source checked now, not after the loss pass, which may take minutes
    if args.qa:
        questions = held_out_documents(Path(args.data) if args.data else qa_dataset(cfg.data), split=args.split)
    batch_size = args.batch_size or cfg.train.micro_batch
    loss_on = args.loss_on or cfg.data.loss_on
    result = evaluate_loss(model, data_dir, split=args.split, batch_size=batch_size, context=cfg.model.block_size,
                           max_batches=args.max_batches, mode=cfg.data.mode, loss_on=loss_on)
    report = {"checkpoint": str(ckpt), "data": str(data_dir), "split": args.split, "batch_size": batch_size,
              "context": cfg.model.block_size, "max_batches": args.max_batches, "loss_on": loss_on,
              "loss": result.loss, "perplexity": result.perplexity, "bits_per_byte": result.bits_per_byte,
              "tokens": result.tokens, "bytes": result.bytes, "floor": result.floor, "gap": result.gap,
              "sources": {name: figures(r) for name, r in result.sources.items()}}
    if questions is not None:
        qa = qa_accuracy(model, questions, max_questions=args.qa)
        report["qa"] = {"correct": qa.correct, "total": qa.total, "accuracy": qa.accuracy, "skipped": qa.skipped}
    print(json.dumps(report) if args.json else format_report(report))
    return 0


# The flags of the loss (and --qa) report, which --task replaces.
LOSS_FLAGS = ("data", "split", "max_batches", "batch_size", "loss_on", "qa")


def check_mode_flags(args: argparse.Namespace) -> None:
    """A flag the chosen report never reads is a mistake to say, not to ignore: `--task hellaswag
    --qa 50` would otherwise print no QA figure and no word why."""
    if args.task:
        given = [f for f in LOSS_FLAGS if getattr(args, f) and (f != "split" or args.split != "val")]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise UserError(f"{flag} does not apply with --task, which scores the tasks instead of the loss: "
                            f"drop {flag}, or run tinyllm eval once for each")
    elif args.max_items is not None:
        raise UserError("--max-items applies only with --task NAME")


def run_tasks(args: argparse.Namespace) -> int:
    """--task: each task's acc and acc_norm, as lm-evaluation-harness reports them."""
    from tinyllm.eval.tasks import evaluate_task, load_items, parse_tasks

    tasks = parse_tasks(args.task)  # every flag checked before the model loads
    model, _, ckpt = load_run(args, "evaluate")
    report = {"checkpoint": str(ckpt), "tasks": {}}
    for name, path in tasks:
        r = evaluate_task(model, name, load_items(name, path), args.max_items)
        report["tasks"][name] = {"acc": r.acc, "acc_norm": r.acc_norm, "items": r.items, "skipped": r.skipped,
                                 "data": str(path) if path else "hub"}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"checkpoint: {ckpt}")
    for name, t in report["tasks"].items():
        skipped = f", {t['skipped']} skipped (gold index outside the choices)" if t["skipped"] else ""
        print(f"{name}: acc {t['acc']:.4f}  acc_norm {t['acc_norm']:.4f}  ({t['items']} items{skipped})")
    return 0


def figures(r) -> dict:
    """One source's figures, as the report's JSON gives them."""
    return {"loss": r.loss, "perplexity": r.perplexity, "bits_per_byte": r.bits_per_byte, "tokens": r.tokens,
            "bytes": r.bytes, "floor": r.floor, "gap": r.gap}


def format_report(r: dict) -> str:
    n = r["max_batches"]
    rows = "one whole pass" if n is None else f"{n} batch's worth" if n == 1 else f"{n} batches' worth"
    mixed = len(r["sources"]) > 1
    lines = [
        f"checkpoint:    {r['checkpoint']}",
        f"data:          {r['data']} ({r['split']} split, {rows} of {r['batch_size']} x {r['context']} tokens"
        + (", assistant tokens only)" if r["loss_on"] == "assistant" else ")"),
        f"{r['split']} loss:{' ' * (9 - len(r['split']))}{r['loss']:.4f} nats/token"
        + (f" (its {len(r['sources'])} sources together, each token counting once)" if mixed else ""),
        f"perplexity:    {r['perplexity']:.2f}",
        f"bits per byte: {r['bits_per_byte']:.4f}" if r["bits_per_byte"] is not None else "bits per byte: n/a (no bytes)",
        f"tokens:        {r['tokens']:,}",
    ]
    if r["floor"] is not None:
        lines.append(f"corpus floor:  {r['floor']:.4f} nats/token (gap {r['gap']:.4f})")
    if mixed:
        lines.append("by source:")
    for name, s in r["sources"].items() if mixed else ():
        bpb = f"{s['bits_per_byte']:.4f} bits/byte" if s["bits_per_byte"] is not None else "n/a bits/byte"
        floor = f", floor {s['floor']:.4f} (gap {s['gap']:.4f})" if s["floor"] is not None else ""
        lines.append(f"  {name}: {s['loss']:.4f} nats/token, {bpb}, {s['tokens']:,} tokens{floor}")
    if "qa" in r:
        qa = r["qa"]
        line = f"qa accuracy:   {qa['correct']}/{qa['total']} exact answers ({100 * qa['accuracy']:.1f}%)"
        if qa["skipped"]:
            line += f"; {qa['skipped']} questions skipped (too long for the context)"
        lines.append(line)
    return "\n".join(lines)
