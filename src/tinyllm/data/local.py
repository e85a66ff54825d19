"""Local files as documents: `.txt` (a file is a document), `.jsonl` / `.json` / `.parquet`
(a record is a document, its text in one field), given as files, folders or globs.

Why it is shaped this way:
- Files are read in sorted path order and records in file order, so a source is a deterministic
  stream; `read_documents(start=k)` skips the first k records without decoding them, which is how
  an interrupted `prepare` resumes. Skipping is cheap: a `.txt` file is not opened, a `.jsonl`
  line is not parsed, a parquet row group is not read.
- Bytes that are not UTF-8 are replaced (U+FFFD) and the document is counted in
  `ReadCounters.replaced_utf8`, so a bad file neither stops the run nor passes unnoticed. A
  `.txt` file that is not text at all (NUL bytes, or over a quarter invalid) is refused instead:
  replacing most of it would train on noise.
- A field may hold text or a chat (a list of {"role", "content"} messages), so the same reader
  serves pretraining text and instruction data.
- Everything a user can get wrong (missing path, bad JSON, missing field) is a `UserError` naming
  the file, line and field.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

from tinyllm.data.document import Document
from tinyllm.data.manifest import LOCK
from tinyllm.errors import UserError

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
# The UTF-8 byte order mark Windows editors put first: a marker, not text (and json refuses it).
BOM = b"\xef\xbb\xbf"


@dataclass
class ReadCounters:
    """Problems a source met and worked around, reported in the manifest."""

    replaced_utf8: int = 0  # documents whose invalid UTF-8 bytes were replaced with U+FFFD


def expand_paths(pattern: str, what: str) -> list[Path]:
    """The readable files `pattern` names (a file, a folder searched recursively, or a glob)."""
    path = Path(pattern).expanduser()
    if any(c in pattern for c in "*?["):
        found = [Path(p) for p in glob.glob(str(path), recursive=True)]
        files = sorted(p for p in found if _is_input(p))
        if not files:
            raise UserError(f"{what}: the pattern {pattern} matches no {'/'.join(SUFFIXES)} file")
        return files
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if _is_input(p))
        if not files:
            raise UserError(f"{what}: the folder {pattern} holds no {'/'.join(SUFFIXES)} file")
        return files
    if not path.exists():
        raise UserError(f"{what}: no such file, folder or source name {pattern!r} (tinyllm prepare --list-sources shows the names)")
    if path.suffix not in SUFFIXES:
        raise UserError(f"{what}: {pattern} is a {path.suffix or 'suffix-less'} file; tinyllm reads {', '.join(SUFFIXES)}")
    return [path]


def _is_input(path: Path) -> bool:
    # A dataset prepared into the source's own folder (--source notes --out notes/tokens): its
    # manifest.json is no text, and listing it would make the same command a different dataset.
    return path.is_file() and path.suffix in SUFFIXES and not (path.parent / LOCK).exists()


def decode(raw: bytes, counters: ReadCounters) -> str:
    """UTF-8 text from bytes; invalid sequences become U+FFFD and the document is counted."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        counters.replaced_utf8 += 1
        return raw.decode("utf-8", errors="replace")


def read_documents(files: list[Path], field: str, counters: ReadCounters, start: int = 0) -> Iterator[Document]:
    """Every record of `files` as a Document, from record number `start` on."""
    readers = {".txt": _txt, ".jsonl": _jsonl, ".json": _json, ".parquet": _parquet}
    skip = start
    for path in files:
        # Each reader yields the file's documents after its first `skip` records and returns how
        # many records it skipped.
        try:
            skip -= yield from readers[path.suffix](path, field, counters, skip)
        except FileNotFoundError:  # listed when the run started, deleted or moved since
            raise UserError(f"{path} is gone: it was deleted or moved while tinyllm prepare read its source; "
                            "put it back, or run again without it") from None


def _txt(path: Path, field: str, counters: ReadCounters, skip: int) -> Generator[Document, None, int]:
    if skip > 0:
        return 1
    raw = path.read_bytes().removeprefix(BOM)
    text = decode(raw, counters)
    # A few stray bytes are replaced and counted; a file that is mostly not UTF-8 is not text at all.
    bad = text.count("\ufffd") - raw.count("\ufffd".encode())
    if b"\0" in raw or bad > len(text) // 4:
        why = "it holds NUL bytes" if b"\0" in raw else f"{bad:,} of its {len(text):,} characters are not valid UTF-8"
        raise UserError(f"{path} is not UTF-8 text ({why}: a binary file, or another encoding such as UTF-16): "
                        "convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8) or leave it out")
    yield Document(text=text)
    return 0


def _jsonl(path: Path, field: str, counters: ReadCounters, skip: int) -> Generator[Document, None, int]:
    skipped = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1:
                line = line.removeprefix(BOM)
            if not line.strip():
                continue
            if skipped < skip:
                skipped += 1
                continue
            text = decode(line, counters)
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {lineno} is not valid JSON ({e.msg}): fix or remove that line") from None
            yield record_document(record, field, f"{path} line {lineno}")
    return skipped


def _json(path: Path, field: str, counters: ReadCounters, skip: int) -> Generator[Document, None, int]:
    before = counters.replaced_utf8
    text = decode(path.read_bytes().removeprefix(BOM), counters)
    had_bad_bytes = counters.replaced_utf8 > before
    counters.replaced_utf8 = before  # counted per document below, not per file
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): fix it, or use .jsonl for one record per line") from None
    if isinstance(records, dict) and isinstance(records.get("data"), list):
        records = records["data"]
    if not isinstance(records, list):
        raise UserError(f"{path} must hold a JSON list of records (objects with a {field!r} field)")
    for n, record in enumerate(records[skip:], skip):
        doc = record_document(record, field, f"{path} record {n}")
        if had_bad_bytes and "\ufffd" in doc.rendered():
            counters.replaced_utf8 += 1
        yield doc
    return min(skip, len(records))


def _parquet(path: Path, field: str, counters: ReadCounters, skip: int) -> Generator[Document, None, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise  # gone, not unreadable: read_documents says so
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path} is not a readable parquet file ({e})") from None
    if field not in pf.schema_arrow.names:
        raise UserError(f"{path} has no field {field!r} (its columns: {', '.join(pf.schema_arrow.names)}): pass --field NAME")
    rows = pf.metadata.num_rows
    if skip >= rows:
        return rows
    n = 0
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        if n + batch.num_rows <= skip:
            n += batch.num_rows
            continue
        for value in batch.column(0).to_pylist():
            if n >= skip:
                yield value_document(value, field, f"{path} row {n}")
            n += 1
    return skip


def record_document(record: object, field: str, where: str) -> Document:
    """The Document in one JSON record's `field`."""
    if not isinstance(record, dict):
        raise UserError(f"{where} is a JSON {type(record).__name__}, expected an object with a {field!r} field")
    if field not in record:
        raise UserError(f"{where} has no field {field!r} (it has: {', '.join(map(str, record)) or 'nothing'}): pass --field NAME")
    return value_document(record[field], field, where)


def value_document(value: object, field: str, where: str) -> Document:
    """Text becomes a document's text; a list of messages becomes its conversation."""
    if value is None:
        return Document(where=where)  # counted as empty by prepare
    if isinstance(value, str):
        return Document(text=value, where=where)
    if isinstance(value, list):
        return Document(messages=tuple(value), where=where)
    raise UserError(f"{where}: field {field!r} is a {type(value).__name__}, expected text or a list of chat messages")
