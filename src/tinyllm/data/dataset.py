"""The dataset a run reads: its `data.dir`, or the built-in corpus prepared once into a cache.

Why a module of its own: the trainer, `tinyllm eval` and the benchmarks all ask "which prepared
directory does this run read?", and the answer may prepare the built-in corpus, so it needs the
whole ingest pipeline. Here it has one home that the memmap reader (`loader`) never imports.
Scoring a run after training (`trained_dataset`) asks the same question of a run whose data.dir
may have been deleted since.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from tinyllm.data.manifest import MANIFEST
from tinyllm.data.prepare import PrepareOptions, prepare, prepare_settings
from tinyllm.data.source_specs import resolve_sources
from tinyllm.data.sources import BUILTIN_MAX_TOKENS
from tinyllm.errors import UserError
from tinyllm.tokenizer import get_tokenizer

if TYPE_CHECKING:
    from tinyllm.config import DataConfig


def run_dataset(data: DataConfig) -> Path:
    """The prepared directory a run with this data config reads (preparing the built-in one if needed)."""
    if data.dir:
        return Path(data.dir)
    return default_builtin_dataset(max_tokens=data.builtin_tokens, questions=data.builtin_questions)


def trained_dataset(data: DataConfig) -> Path:
    """`run_dataset` for a run that has trained: a data.dir gone since then is named as the run's."""
    path = run_dataset(data)
    if data.dir and not (path / MANIFEST).is_file():
        raise UserError(f"the run's data {path} (data.dir in its config.toml) is gone: prepare it again with "
                        f"`tinyllm prepare --out {path}`, or score another dataset with `tinyllm eval --data DIR`")
    return path


def qa_dataset(data: DataConfig) -> Path:
    """The prepared directory whose held-out questions score a run (`tinyllm eval --qa`, the end of
    a chat fine-tuning): its own, but the built-in corpus's sampled questions for a run that read
    the every-question corpus, so that every run is scored on the same questions."""
    return trained_dataset(replace(data, builtin_questions="sampled"))


def default_builtin_dataset(max_tokens: int = BUILTIN_MAX_TOKENS, seed: int = 0, cache_dir: Path | None = None,
                            questions: str = "sampled") -> Path:
    """The builtin corpus prepared once into a cache directory and reused afterwards.

    The directory is `<cache>/builtin-<key>` where the cache is `cache_dir`, else `$TINYLLM_CACHE`,
    else `~/.cache/tinyllm`, and the key hashes everything that shapes the data.
    """
    sources = resolve_sources([], seed=seed, builtin_questions=questions)
    options = PrepareOptions(max_tokens=max_tokens)
    tok = get_tokenizer()
    key_src = json.dumps(prepare_settings(sources, options, tok), sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:12]
    root = Path(cache_dir or os.environ.get("TINYLLM_CACHE") or Path.home() / ".cache" / "tinyllm").expanduser()
    out = root / f"builtin-{key}"
    if not (out / MANIFEST).is_file():
        prepare(sources, out, options)
    return out
