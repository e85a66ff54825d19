"""Benchmarks behind `tinyllm bench WHAT`: one module per measured subsystem.

A benchmark module defines `HELP` (one line), `add_arguments(parser)`, `run(args) -> dict` (the
figures, JSON-serialisable) and `format(result) -> str` (the same figures for a person). The CLI
adds `--json` to each. Adding a benchmark is adding its module and a line to `BENCHMARKS`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

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
