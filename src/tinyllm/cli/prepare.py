"""`tinyllm prepare`: sources -> token shards + manifest.json in --out (see tinyllm.data.prepare)."""

from __future__ import annotations

import argparse
import sys

from tinyllm.data.prepare import PrepareOptions, prepare
from tinyllm.data.source_specs import resolve_sources
from tinyllm.data.sources import describe_sources
from tinyllm.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    defaults = PrepareOptions()
    p = sub.add_parser(
        "prepare",
        help="tokenize text sources into token shards for training",
        description="Stream documents from one or more sources, tokenize them on all cores, split "
        "train/val by a hash of each document (or, with --val-source, train on every --source document "
        "and validate on the --val-source ones), and write uint16 token shards plus DIR/manifest.json. "
        "An interrupted run resumes when run again with the same flags.",
    )
    p.add_argument(
        "--source",
        action="append",
        metavar="SPEC",
        default=[],
        help="a source: NAME[:WEIGHT] (see --list-sources), NAME=PATH[:WEIGHT] (a hub source read from "
        "local files in its own schema) or PATH[:WEIGHT] (a .txt/.jsonl/.json/.parquet file, folder or "
        "glob); repeat to mix, WEIGHT sets the share of training rows (default 1); default: builtin",
    )
    p.add_argument(
        "--val-source",
        action="append",
        metavar="SPEC",
        default=[],
        help="your own validation set, in the same forms as --source but with no weight; repeatable. "
        "With it every --source document is trained on (no hash split) and only --val-source "
        "documents are validated on; a file may not be both",
    )
    p.add_argument("--out", metavar="DIR", help="directory for the shards and manifest.json (created if missing)")
    p.add_argument("--list-sources", action="store_true", help="list the named sources and exit")
    p.add_argument("--field", default="text", metavar="NAME",
                   help="the field holding the text (or a chat message list) in local .jsonl/.json/.parquet files (default: text)")
    p.add_argument("--max-tokens", type=int, metavar="N",
                   help="stop each source after N tokens (default: builtin 2,000,000, hub sources 50,000,000, "
                   "local files and python-docs all; 0 = no cap)")
    p.add_argument("--max-docs", type=int, metavar="N", help="stop each source after N documents (default: no cap)")
    p.add_argument("--val-fraction", type=float, metavar="F",
                   help=f"share of documents held out for validation, chosen by a hash of each document "
                   f"(default: {defaults.val_fraction}; the first documents use 0.25 until a source has 8 val "
                   "documents); not with --val-source")
    p.add_argument("--seed", type=int, default=0, help="seed of the builtin corpus (default: 0)")
    p.add_argument("--shard-tokens", type=int, default=defaults.shard_tokens, metavar="N",
                   help=f"tokens per shard file; a finished shard survives an interruption (default: {defaults.shard_tokens:,})")
    p.add_argument("--threads", type=int, metavar="N", help="tokenizer threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    # Catches the paths a shell made of an unquoted glob: `--source notes/*.txt` arrives as
    # `--source notes/a.txt notes/b.txt`, and `run` says to quote the pattern.
    p.add_argument("stray", nargs="*", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # A mistyped flag (--ouput) is no path a shell expanded: say so, not "quote the glob".
    if flags := [a for a in args.stray if a.startswith("-")]:
        raise UserError(f"unrecognized arguments: {' '.join(flags)} (tinyllm prepare --help lists the flags)")
    if args.stray:
        raise UserError(f"unexpected {' '.join(args.stray)}: each --source or --val-source takes one SPEC; if your shell expanded "
                        "a glob into these paths, quote the pattern (--source 'notes/*.txt') so that tinyllm "
                        "expands it, as one source")
    if args.list_sources:
        print(describe_sources())
        return 0
    if not args.out:
        raise UserError("give --out DIR, the directory to write the dataset to")
    if args.val_source and args.val_fraction is not None:
        raise UserError(f"--val-fraction {args.val_fraction} and --val-source exclude each other: with "
                        "--val-source every --source document is trained on; drop --val-fraction")
    options = PrepareOptions(
        val_fraction=PrepareOptions.val_fraction if args.val_fraction is None else args.val_fraction,
        max_docs=args.max_docs,
        max_tokens=args.max_tokens,
        shard_tokens=args.shard_tokens,
        threads=args.threads,
        progress=not args.quiet,
    )
    options.check()
    sources = resolve_sources(args.source, val_specs=args.val_source, field=args.field, seed=args.seed)
    try:
        manifest = prepare(sources, args.out, options)
    except KeyboardInterrupt:
        print("tinyllm prepare: finished shards are kept; run the same command again to resume", file=sys.stderr)
        raise
    print(summary(manifest, args.out))
    return 0


def summary(manifest: dict, out: str) -> str:
    """What was prepared, per source and split, with anything that was worked around."""
    lines = []
    for name, entry in manifest["sources"].items():
        sp = entry["splits"]
        splits = {"train": ["train"], "val": ["val"]}.get(entry.get("split"), ["train", "val"])
        role = "--val-source" if splits == ["val"] else f"weight {entry['weight']:g}"
        line = f"{name} ({role}): " + ", ".join(
            f"{s} {sp[s]['documents']:,} docs {sp[s]['tokens']:,} tokens" for s in splits)
        if "floor" in entry:
            line += f", val floor {entry['floor']:.4f} nats/token"
        lines.append(line)
        if entry["skipped_empty"]:
            lines.append(f"  warning: skipped {entry['skipped_empty']:,} empty documents")
        if entry["replaced_utf8"]:
            lines.append(f"  warning: {entry['replaced_utf8']:,} documents had invalid UTF-8, replaced with U+FFFD")
    lines.append(f"wrote {out}/manifest.json")
    return "\n".join(lines)
