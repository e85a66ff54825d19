"""Where documents come from: a registry of named sources (the builtin corpus, python-docs, the hub's), and local paths.

Why it is shaped this way:
- Every source is a deterministic stream of `Document`s with `documents(start)`, so `prepare`
  handles the builtin corpus, a Hugging Face dataset and a folder of files the same way, and
  resumes any of them by record number.
- A hub source is a hub id plus a function from one record of that dataset's exact schema to a
  Document. It always loads through `datasets.load_dataset(..., streaming=True)`: from the hub,
  or, with `--source NAME=PATH`, from local files through the packaged parquet/json builder. The
  same record -> Document code runs either way, which is how it is tested with no network.
- The `--source` and `--val-source` specs that name these are read in `data.source_specs`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tinyllm.data import pydocs
from tinyllm.data.document import Document
from tinyllm.data.hub_logs import quiet_hub
from tinyllm.data.local import ReadCounters, expand_paths, read_documents
from tinyllm.errors import UserError

BUILTIN = "builtin"
PYDOCS = "python-docs"
BUILTIN_MAX_TOKENS = 2_000_000  # the builtin corpus is infinite; ~1 minute to prepare on 2 cores
HUB_MAX_TOKENS = 50_000_000  # a day of CPU training; raise it with --max-tokens


# -- hub record -> Document ----------------------------------------------------------------------
def _text(record: dict, key: str) -> str:
    value = record[key]  # a missing key is caught up front by the column check
    return "" if value is None else str(value)


def _join(*parts: str) -> str:
    return "\n\n".join(p for p in parts if p.strip())


def _chat(user: str, assistant: str) -> Document:
    return Document(messages=({"role": "user", "content": user}, {"role": "assistant", "content": assistant}))


@dataclass(frozen=True)
class HubEntry:
    name: str
    hub_id: str
    config: str | None
    fields: tuple[str, ...]  # the columns to_document reads; checked before streaming
    to_document: Callable[[dict], Document]
    recipe: str  # record -> text, for --list-sources
    max_tokens: int | None = HUB_MAX_TOKENS


HUB: dict[str, HubEntry] = {
    e.name: e
    for e in (
        HubEntry("wikipedia", "wikimedia/wikipedia", "20231101.en", ("text",),
                 lambda r: Document(text=_text(r, "text")), "text"),
        HubEntry("simplestories", "SimpleStories/SimpleStories", None, ("story",),
                 lambda r: Document(text=_text(r, "story")), "story"),
        HubEntry("fineweb-edu", "HuggingFaceFW/fineweb-edu", "sample-10BT", ("text",),
                 lambda r: Document(text=_text(r, "text")), "text"),
        HubEntry("openwebtext2", "Geralt-Targaryen/openwebtext2", None, ("title", "text"),
                 lambda r: Document(text=_join(_text(r, "title"), _text(r, "text"))), "title + text"),
        HubEntry("alpaca", "tatsu-lab/alpaca", None, ("instruction", "input", "output"),
                 lambda r: _chat(_join(_text(r, "instruction"), _text(r, "input")), _text(r, "output")),
                 "chat: user = instruction (+ input), assistant = output", None),
        HubEntry("reddit-instruct", "euclaise/reddit-instruct-curated", None, ("post_title", "post_text", "comment_text"),
                 lambda r: _chat(_join(_text(r, "post_title"), _text(r, "post_text")), _text(r, "comment_text")),
                 "chat: user = post_title (+ post_text), assistant = comment_text", None),
    )
}
NAMES = (BUILTIN, PYDOCS, *HUB)
SPLIT_FLAGS = {None: "--source", "train": "--source", "val": "--val-source"}


# -- sources -------------------------------------------------------------------------------------
class Source(ABC):
    """A named, deterministic stream of documents, read from record `start` on."""

    name: str
    spec: str  # as the user wrote it
    weight: float
    max_tokens: int | None  # default cap; --max-tokens overrides
    counters: ReadCounters
    # None: each document goes to train or val by a hash of its text; "train" or "val": every
    # document goes there (the sources of a prepare run with --val-source).
    split: str | None = None

    @property
    def flag(self) -> str:
        """The flag that named this source, for messages."""
        return SPLIT_FLAGS[self.split]

    @abstractmethod
    def identity(self) -> dict:
        """What must match for two runs to produce the same documents (resume or refuse)."""

    @abstractmethod
    def documents(self, start: int = 0) -> Iterator[Document]:
        """The documents from record `start` on (records include ones prepare skips as empty)."""


class BuiltinSource(Source):
    """The offline generated corpus (tinyllm.data.builtin): endless, so always capped."""

    max_tokens = BUILTIN_MAX_TOKENS

    def __init__(self, spec: str, weight: float, seed: int, split: str | None = None,
                 questions: str = "sampled") -> None:
        self.name, self.spec, self.weight, self.seed, self.split = BUILTIN, spec, weight, seed, split
        self.questions = questions  # data.builtin_questions
        self.counters = ReadCounters()

    def _corpus(self):  # -> BuiltinCorpus
        from tinyllm.data.builtin import QUESTION_LEXICONS, BuiltinCorpus

        return BuiltinCorpus(seed=self.seed, lexicon=QUESTION_LEXICONS[self.questions])

    def identity(self) -> dict:
        return {"kind": "builtin", "seed": self.seed, "corpus": self._corpus().identity}

    def documents(self, start: int = 0) -> Iterator[Document]:
        return self._corpus().documents(start)


class PythonDocsSource(Source):
    """Real English offline: this Python's standard library documentation (tinyllm.data.pydocs)."""

    max_tokens = None  # all of it: 0.73 M tokens on CPython 3.11

    def __init__(self, spec: str, weight: float, split: str | None = None) -> None:
        self.name, self.spec, self.weight, self.split = PYDOCS, spec, weight, split
        self.counters = ReadCounters()

    def identity(self) -> dict:
        return pydocs.identity()

    def documents(self, start: int = 0) -> Iterator[Document]:
        return pydocs.documents(start)


class LocalSource(Source):
    """Files, folders or globs on disk, read by tinyllm.data.local."""

    max_tokens = None

    def __init__(self, name: str, spec: str, path: str, weight: float, field: str, split: str | None = None) -> None:
        self.name, self.spec, self.weight, self.field, self.split = name, spec, weight, field, split
        self.files = expand_paths(path, f"{self.flag} {spec}")
        self.counters = ReadCounters()

    def identity(self) -> dict:
        return {"kind": "local", "field": self.field, "files": _file_ids(self.files)}

    def documents(self, start: int = 0) -> Iterator[Document]:
        return read_documents(self.files, self.field, self.counters, start)


class HubSource(Source):
    """A registry entry streamed through `datasets`: from the hub, or from local files in its schema."""

    def __init__(self, entry: HubEntry, spec: str, weight: float, path: str | None = None,
                 split: str | None = None, name: str | None = None) -> None:
        self.entry, self.name, self.spec, self.weight, self.split = entry, name or entry.name, spec, weight, split
        self.max_tokens = entry.max_tokens
        self.files = expand_paths(path, f"{self.flag} {spec}") if path is not None else None
        self.counters = ReadCounters()

    def identity(self) -> dict:
        e = self.entry
        ident = {"kind": "hub", "hub_id": e.hub_id, "config": e.config}
        if self.files is not None:
            ident["files"] = _file_ids(self.files)
        return ident

    def _where(self) -> str:
        if self.files is None:
            return f"{self.entry.hub_id} on the Hugging Face hub"
        return ", ".join(map(str, self.files[:3])) + (" ..." if len(self.files) > 3 else "")

    def _load(self):  # -> datasets.IterableDataset
        import datasets

        try:
            if self.files is None:
                return datasets.load_dataset(self.entry.hub_id, self.entry.config, split="train", streaming=True)
            builder = _builder(self.files, f"{self.flag} {self.spec}")
            return datasets.load_dataset(builder, data_files=[str(f) for f in self.files], split="train", streaming=True)
        except (OSError, ValueError) as e:  # ConnectionError and DatasetNotFoundError are OSErrors
            # Files given: the network is not the problem, the files are (corrupt, or another format).
            fix = (f"without network, download its files and pass {self.flag} {self.entry.name}=PATH" if self.files is None
                   else f"check that they are {self.entry.name}'s own parquet or JSON lines files")
            raise UserError(f"{self.flag} {self.spec}: cannot load {self._where()} ({_first_line(e)}); {fix}") from None

    def documents(self, start: int = 0) -> Iterator[Document]:
        with quiet_hub():  # a failure is said once, in the UserError `_load` raises
            yield from self._records(start)

    def _records(self, start: int) -> Iterator[Document]:
        import pyarrow as pa

        ds = self._load()
        if start:
            ds = ds.skip(start)
        it = iter(ds)
        checked = False
        while True:
            try:
                record = next(it)
            except StopIteration:
                return
            except (OSError, ValueError, pa.ArrowException) as e:
                raise UserError(f"{self.flag} {self.spec}: reading {self._where()} failed ({_first_line(e)})") from None
            if not checked:
                missing = [f for f in self.entry.fields if f not in record]
                if missing:
                    raise UserError(
                        f"{self.flag} {self.spec}: {self._where()} has no field {missing[0]!r} (it has: "
                        f"{', '.join(record)}); {self.entry.name} needs {', '.join(self.entry.fields)}"
                    )
                checked = True
            yield self.entry.to_document(record)


def _builder(files: list[Path], where: str) -> str:
    kinds = {{".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}[f.suffix] for f in files}
    if len(kinds) > 1 or "text" in kinds:
        raise UserError(f"{where}: a hub source's local files must all be parquet or all JSON lines, got {sorted(kinds)}")
    return kinds.pop()


def _file_ids(files: list[Path]) -> list[list]:
    # Absolute, so a resumed run from another working directory is still the same source.
    return [[str(f.resolve()), f.stat().st_size] for f in files]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def describe_sources() -> str:
    """The table `tinyllm prepare --list-sources` prints."""
    rows = [("name", "hub id (config)", "record -> document", "default cap")]
    rows.append((BUILTIN, "(offline, generated)", "story + questions about it", f"{BUILTIN_MAX_TOKENS:,} tokens"))
    rows.append((PYDOCS, "(offline, this Python's own)", "a stdlib module's docstrings, or a help topic",
                 "all (~730,000 tokens)"))
    for e in HUB.values():
        hub = e.hub_id + (f" ({e.config})" if e.config else "")
        rows.append((e.name, hub, e.recipe, f"{e.max_tokens:,} tokens" if e.max_tokens else "whole dataset"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3] for r in rows]
    lines += [
        "",
        "Also: a local path (file, folder or glob): .txt (a file is a document), .jsonl/.json/.parquet",
        "(a record is a document; --field NAME, default text). A hub source reads local files in its",
        "own schema with NAME=PATH, e.g. --source wikipedia=dumps/wiki/. Append :WEIGHT to set the mix.",
        "",
        f"{PYDOCS}: real English with no download, the documentation of the standard library of the Python",
        "running tinyllm (docstrings read from its source files, and the language reference's help()",
        "topics; tests and generated codecs left out). Python Software Foundation License: permissive,",
        "not public domain. A yardstick of real text beside the synthetic builtin corpus.",
        "",
        "--val-source SPEC (same forms, no weight) holds out your own validation files: every --source",
        "document is then trained on and every --val-source document only validated on.",
    ]
    return "\n".join(lines)
