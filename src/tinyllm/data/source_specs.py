"""`--source` and `--val-source` specs, read into the sources (`data.sources`) a dataset is prepared from.

Why it is shaped this way:
- `--source` takes `name[:weight]`, `name=path[:weight]` or `path[:weight]`; the weight only sets
  the loader's mixture, so it is not part of a source's identity.
- `--val-source` takes the same specs without a weight. With any, every document of a `--source`
  goes to train and every document of a `--val-source` to val (`Source.split`), so a user's own
  held-out set is the yardstick and all of the train set is trained on. A val source that reads
  a file (or the same documents) a train source reads is refused: its loss would be a train loss.
- Every source gets a unique name: the dataset's manifest keys its sources by name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from tinyllm.data.sources import (
    BUILTIN,
    HUB,
    NAMES,
    PYDOCS,
    BuiltinSource,
    HubSource,
    LocalSource,
    PythonDocsSource,
    Source,
)
from tinyllm.errors import UserError


@dataclass(frozen=True)
class SourceSpec:
    text: str
    name: str | None  # a registry name, or None for a plain local path
    path: str | None
    weight: float
    weighted: bool = False  # the text gave a weight


def parse_spec(text: str, flag: str = "--source") -> SourceSpec:
    """`name[:weight]`, `name=path[:weight]` or `path[:weight]`; `flag` names the option in errors."""
    body, weight = text, 1.0
    head, _, tail = text.rpartition(":")
    if head and _is_number(tail):
        body, weight = head, float(tail)
        if not (math.isfinite(weight) and weight > 0):
            raise UserError(f"{flag} {text}: the weight {tail} must be a positive number")
    if not body:
        raise UserError(f"{flag} {text}: give a source name or a path before the weight")
    weighted = body != text
    name, eq, path = body.partition("=")
    # A file named with "=" (a=b.txt) is a path, unless what precedes it names a hub source.
    if eq and (name in HUB or not Path(body).expanduser().exists()):
        if name not in HUB:
            hint = f"{name} has no files" if name in NAMES else f"hub sources are {', '.join(HUB)}"
            raise UserError(f"{flag} {text}: only a hub source takes =PATH ({hint})")
        if not path:
            raise UserError(f"{flag} {text}: give the path after '='")
        return SourceSpec(text, name, path, weight, weighted)
    if body in NAMES:
        return SourceSpec(text, body, None, weight, weighted)
    return SourceSpec(text, None, body, weight, weighted)


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def resolve_sources(specs: list[str], *, val_specs: list[str] | None = None, field: str = "text",
                    seed: int = 0, builtin_questions: str = "sampled") -> list[Source]:
    """Sources for the `--source` specs (the builtin corpus when there are none, its questions
    `data.builtin_questions`), then the `--val-source` specs, names unique. With val specs every
    source has a fixed split (module docstring)."""
    val_specs = val_specs or []
    train: list[Source] = []
    for text in specs or [BUILTIN]:
        src = _resolve(parse_spec(text), "train" if val_specs else None, field, seed, train, builtin_questions)
        if any(o.name == src.name for o in train):
            raise UserError(f"--source {text}: {src.name} is given twice; give each source once")
        _refuse_read_twice(src, train)
        train.append(src)
    val: list[Source] = []
    for text in val_specs:
        s = parse_spec(text, "--val-source")
        if s.weighted:
            raise UserError(f"--val-source {text}: a val source takes no weight (weights set the training "
                            f"mix; every val document is scored once): drop the :{text.rpartition(':')[2]}")
        src = _resolve(s, "val", field, seed, train + val)
        if any(o.spec == text or o.name == src.name for o in val):
            raise UserError(f"--val-source {text} is given twice; give each source once")
        _refuse_read_twice(src, val)
        _refuse_trained_on(src, train)
        val.append(src)
    return train + val


def _resolve(s: SourceSpec, split: str | None, field: str, seed: int, taken: list[Source],
             builtin_questions: str = "sampled") -> Source:
    if s.name == BUILTIN:
        src: Source = BuiltinSource(s.text, s.weight, seed, split, builtin_questions)
    elif s.name == PYDOCS:
        src = PythonDocsSource(s.text, s.weight, split)
    elif s.name is not None:
        src = HubSource(HUB[s.name], s.text, s.weight, s.path, split)
    else:
        # Named among its own split first, so that a clash with a train source gets "-val" below.
        src = LocalSource(_local_name(s.path, [o for o in taken if o.split == split]), s.text, s.path, s.weight,
                          field, split)
    if split == "val" and any(o.name == src.name for o in taken if o.split == "train"):
        # e.g. --source wikipedia=dumps/train --val-source wikipedia=dumps/val: one name per source
        src.name = _unique(f"{src.name}-val", taken)
    return src


def _shared_files(a: Source, b: Source) -> str:  # "/x/a.txt and 2 more", or "" when none
    shared = sorted({f.resolve() for f in getattr(a, "files", None) or ()} & {f.resolve() for f in getattr(b, "files", None) or ()})
    return f"{shared[0]}{f' and {len(shared) - 1} more' if len(shared) > 1 else ''}" if shared else ""


def _refuse_read_twice(src: Source, same_split: list[Source]) -> None:
    """A file read by two sources of one split (notes/ and notes/a.txt) would be trained on, or scored, twice."""
    for o in same_split:
        if shared := _shared_files(src, o):
            hint = "" if src.split == "val" else " (a :WEIGHT sets a source's share)"
            raise UserError(f"{src.flag} {src.spec}: {shared} is also read by {o.flag} {o.spec}; give each file once{hint}")


def _refuse_trained_on(val: Source, train: list[Source]) -> None:
    """A val source must hold none of the training documents: its loss would be a training loss."""
    for t in train:
        if shared := _shared_files(val, t):
            raise UserError(f"--val-source {val.spec}: {shared} is also read by --source {t.spec}; a file is either "
                            "trained on or validated on: give validation files of their own")
        if t.identity() == val.identity():
            raise UserError(f"--val-source {val.spec} reads the same documents as --source {t.spec}; give "
                            "validation files of their own")


def _local_name(path: str, taken: list[Source]) -> str:
    stem = Path(re.sub(r"[*?\[\]]+.*$", "", path.rstrip("/")) or ".").resolve().stem or "files"
    return _unique("local-" + (re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-") or "files"), taken)


def _unique(base: str, taken: list[Source]) -> str:
    names = {s.name for s in taken}
    name, n = base, 2
    while name in names:
        name, n = f"{base}-{n}", n + 1
    return name
