"""`manifest.json`: the one file that says what a prepared dataset directory holds.

`prepare` writes it last (temp name + rename), so its presence means the dataset is complete;
the loader, the trainer and `prepare` itself (to resume or refuse) all read it through
`load_manifest`, which checks that it is ours, of a version we read, and made by this tokenizer,
and turns every problem into a one-line `UserError` that says to run `tinyllm prepare`.

Shape (one entry per source, in mixture order):
    {"format": "tinyllm-tokens", "version": 2, "tokenizer": {...}, "dtype": "uint16",
     "config": {...what made it; compared on re-runs...},
     "sources": {NAME: {"weight": w, "spec": ..., "splits": {"train": {"documents", "tokens",
                 "bytes", "shards": [{"file", "tokens", "documents", "bytes", "crc32"}]}, "val": {...}},
                 "skipped_empty": n, "replaced_utf8": n, "floor": nats/token or absent}},
     "splits": {"train": {"documents", "tokens", "bytes"}, "val": {...}}, "floor": nats/token or absent}

A split's "bytes" is the UTF-8 size of its documents' `Document.rendered()` text (chat markup
written out, the trailing <|endoftext|> not counted): the denominator of bits per byte. Version 2
added it and the shards' assistant masks; version 1 datasets still load (without either).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tinyllm.errors import UserError
from tinyllm.tokenizer import get_tokenizer

MANIFEST = "manifest.json"
FORMAT = "tinyllm-tokens"
VERSION = 2
READABLE_VERSIONS = (1, 2)
SPLITS = ("train", "val")
LOCK = ".prepare.lock"  # in every directory prepare writes to: marks it as a dataset, not text


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON to a temp name in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`, or a UserError naming the file and the fix."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}): delete {path.parent} and run tinyllm prepare again") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a {what}: delete {path.parent} and run tinyllm prepare again")
    return obj


def load_manifest(data_dir: str | Path) -> dict:
    """The manifest of a prepared dataset, checked against this tinyllm and its tokenizer."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if not data_dir.is_dir():
        raise UserError(f"dataset directory {data_dir} does not exist: run tinyllm prepare --out {data_dir} first")
    if not path.is_file():
        raise UserError(f"{data_dir} has no {MANIFEST}: run tinyllm prepare --out {data_dir} first (or let it finish)")
    manifest = read_json(path, "tinyllm dataset manifest")
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("sources"), dict):
        raise UserError(f"{path} is not a tinyllm dataset manifest: run tinyllm prepare --out DIR to make one")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise UserError(f"{path} has format version {manifest.get('version')}, this tinyllm reads "
                        f"{' and '.join(map(str, READABLE_VERSIONS))}: prepare the data again")
    check_tokenizer(manifest.get("tokenizer"), data_dir)
    return manifest


def check_tokenizer(recorded: object, data_dir: Path) -> None:
    """Refuse ids made by another tokenizer: they would silently mean other words."""
    ours = get_tokenizer().identity
    if recorded != ours:
        name = recorded.get("name") if isinstance(recorded, dict) else recorded
        raise UserError(
            f"{data_dir} was prepared with tokenizer {name!r} ({recorded}), not this tinyllm's {ours['name']!r}: "
            f"run tinyllm prepare again into a new directory"
        )
