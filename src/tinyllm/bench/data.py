"""`tinyllm bench data`: how fast `prepare` turns English text into shards, on 1 and 2 cores.

Why it is shaped this way: the text is generated in-process (the builtin corpus, so no network
and no files to ship) and written once to a `.jsonl` file, and then the real `prepare` path runs
on it (read, decode, hash, tokenize, route, write, CRC), so the figure is what a user gets from
local files. Each run is pinned to N cores (where the OS allows) with N tokenizer threads, so "1
core" really is one core, reader and tokenizer included. Core counts alternate across repeats
and the best time of each is kept, which keeps drift from other processes on a shared machine
out of the comparison. The loader's packed-batch rate is reported alongside, since it must never
be what a training step waits on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tinyllm.bench import positive_ints
from tinyllm.data.prepare import PrepareOptions, prepare
from tinyllm.data.source_specs import resolve_sources
from tinyllm.errors import UserError

HELP = "prepare throughput (tokens/s) on 1 and 2 cores, and packed-batch loader throughput"
CHARS_PER_TOKEN = 4.3  # builtin stories; only sizes the generated text, the figures use real counts


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=2_000_000, metavar="N",
                   help="about how many tokens of text to prepare (default: 2,000,000)")
    p.add_argument("--stories-per-doc", type=int, default=1, metavar="K",
                   help="join K builtin stories into one document, to measure long documents (default: 1, ~60 tokens)")
    p.add_argument("--repeat", type=int, default=2, metavar="R", help="runs per core count; the best is kept (default: 2)")
    p.add_argument("--cores", metavar="LIST", help="comma-separated core counts, at most the cores this process may "
                   "use; each run gets that many cores and tokenizer threads (default: 1,2, or 1 on a 1-core machine)")


def run(args: argparse.Namespace) -> dict:
    available = len(_available_cores())
    counts = positive_ints("--cores", args.cores or ("1,2" if available > 1 else "1"), "counts", "1,2")
    if max(counts) > available:  # it would run on fewer, and report the figure as this many's
        raise UserError(f"--cores {args.cores}: this process may run on {available} core{'s' * (available > 1)}; "
                        "ask for at most that many")
    if args.tokens < 1000 or args.repeat < 1 or args.stories_per_doc < 1:
        raise UserError("--tokens must be at least 1000, --repeat and --stories-per-doc at least 1")
    with tempfile.TemporaryDirectory(prefix="tinyllm-bench-") as tmp:
        corpus = Path(tmp) / "stories.jsonl"
        docs = _write_corpus(corpus, args.tokens, args.stories_per_doc)
        # Warm-up, untimed: builds the tokenizer and pages in the code and the corpus file.
        prepare(resolve_sources([str(corpus)]), Path(tmp) / "warm-up", PrepareOptions(progress=False, max_docs=1000))
        best: dict[int, float] = {}
        best_cpu: dict[int, float] = {}
        for r in range(args.repeat):
            for n in counts:
                out = Path(tmp) / f"run-{n}-{r}"
                with _pinned(n):
                    t0, c0 = time.perf_counter(), time.process_time()
                    manifest = prepare(resolve_sources([str(corpus)]), out, PrepareOptions(threads=n, progress=False, max_tokens=0))
                    best[n] = min(best.get(n, float("inf")), time.perf_counter() - t0)
                    best_cpu[n] = min(best_cpu.get(n, float("inf")), time.process_time() - c0)
        tokens = sum(s["tokens"] for s in manifest["splits"].values())
        result = {
            "text": f"builtin corpus (seed 0), {args.stories_per_doc} stor{'y' if args.stories_per_doc == 1 else 'ies'} "
                    f"per document, from a .jsonl file",
            "documents": docs,
            "tokens": tokens,
            "megabytes": round(corpus.stat().st_size / 1e6, 1),
            "cores_available": available,
            "prepare_tokens_per_s": {str(n): round(tokens / best[n]) for n in counts},
            # Tokens per CPU-second (all threads): unaffected by other processes taking the cores.
            "prepare_tokens_per_cpu_s": {str(n): round(tokens / best_cpu[n]) for n in counts},
            "loader_tokens_per_s": _loader_rate(out),
        }
    if 1 in best and 2 in best:
        result["speedup_2_vs_1"] = round(best[1] / best[2], 2)
    return result


def _write_corpus(path: Path, tokens: int, per_doc: int) -> int:
    from tinyllm.data.builtin import BuiltinCorpus

    stories = BuiltinCorpus(seed=0).documents()
    chars, docs = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while chars < tokens * CHARS_PER_TOKEN:
            text = "\n\n".join(next(stories).text for _ in range(per_doc))
            f.write(json.dumps({"text": text}) + "\n")
            chars, docs = chars + len(text), docs + 1
    return docs


def _available_cores() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


@contextlib.contextmanager
def _pinned(n: int) -> Iterator[None]:
    """Run on n cores: threads started inside (the tokenizer pool) inherit the affinity."""
    cores = _available_cores()
    if not hasattr(os, "sched_setaffinity") or n >= len(cores):
        yield
        return
    os.sched_setaffinity(0, cores[:n])
    try:
        yield
    finally:
        os.sched_setaffinity(0, cores)


def _loader_rate(data_dir: Path, batches: int = 200) -> int:
    from tinyllm.data.loader import TokenLoader  # torch: imported only when this benchmark runs

    loader = TokenLoader(data_dir, "train", batch_size=16, context=512)
    loader.next_batch()
    t0 = time.perf_counter()
    for _ in range(batches):
        loader.next_batch()
    return round(batches * 16 * 512 / (time.perf_counter() - t0))


def format(result: dict) -> str:
    lines = [f"text: {result['text']}: {result['documents']:,} documents, {result['tokens']:,} tokens, "
             f"{result['megabytes']} MB"]
    for n, rate in result["prepare_tokens_per_s"].items():
        cpu = result["prepare_tokens_per_cpu_s"][n]
        lines.append(f"prepare on {n} core{'s' if n != '1' else ''}: {rate:,} tokens/s ({cpu:,} per CPU-second)")
    if "speedup_2_vs_1" in result:
        lines.append(f"2 cores vs 1: {result['speedup_2_vs_1']}x ({result['cores_available']} cores available)")
    lines.append(f"loader, packed 16x512 batches: {result['loader_tokens_per_s']:,} tokens/s")
    return "\n".join(lines)
