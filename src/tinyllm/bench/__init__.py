"""Benchmarks behind `tinyllm bench WHAT`: one module per measured subsystem.

A benchmark module defines `HELP` (one line), `add_arguments(parser)`, `run(args) -> dict` (the
figures, JSON-serialisable) and `format(result) -> str` (the same figures for a person). The CLI
adds `--json` to each. Adding a benchmark is adding its module and a line to `BENCHMARKS`.
Flags that take a list of sizes (`--cores 1,2`, `--concurrency 1,8,32`) parse it with
`positive_ints`, so they accept and refuse the same lists.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from tinyllm.errors import UserError

BENCHMARKS = {
    "data": "tinyllm.bench.data",
    "decode": "tinyllm.bench.decode",
    "gpu": "tinyllm.bench.gpu",
    "quality": "tinyllm.bench.quality",
    "serve": "tinyllm.bench.serve",
    "train": "tinyllm.bench.train",
}


def load(name: str) -> ModuleType:
    return importlib.import_module(BENCHMARKS[name])


def positive_ints(flag: str, text: str, what: str, example: str) -> list[int]:
    """`text` as comma-separated positive integers, e.g. "1,8,32"; a UserError naming `flag` if not.

    `what` and `example` complete the message: "--cores 0: give comma-separated positive counts, e.g. 1,2".
    """
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserError(f"{flag} {text}: give comma-separated positive {what}, e.g. {example}")
    return values
