"""`prepare`: sources -> token shards + `manifest.json` in one directory, resumable and guarded.

Why it is shaped this way:
- Sources are ingested one after the other (`ingest.SourceIngest`: chunked reading, parallel
  tokenization, hash-based train/val, shards finished at commit points); this module owns the
  directory: `progress.json` after every commit, `manifest.json` last, so its presence means
  "complete", and an interrupted run restarts each source at its last commit, keeping the
  finished shards.
- A second run into the same directory compares the settings that shape the data (sources and
  their files, caps, split (a hash share, or each source's fixed split with --val-source), shard
  size, tokenizer): equal means nothing to do (only the mixture
  weights may change), different is refused with what differs. A lock file serialises runs into
  one directory, since data-parallel ranks may all ask for the same cached builtin dataset.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

from tinyllm import __version__
from tinyllm.data.ingest import SourceIngest, new_state
from tinyllm.data.manifest import (
    FORMAT,
    LOCK,
    MANIFEST,
    SPLITS,
    VERSION,
    read_json,
    write_json_atomic,
)
from tinyllm.data.prepare_options import PrepareOptions
from tinyllm.data.sources import HubSource, Source
from tinyllm.errors import UserError
from tinyllm.tokenizer import Tokenizer, get_tokenizer

PROGRESS = "progress.json"
__all__ = ["PrepareOptions", "prepare", "prepare_settings"]


def prepare(sources: list[Source], out: str | Path, options: PrepareOptions = PrepareOptions()) -> dict:
    """Prepare `sources` into `out` (resuming an interrupted run there); returns the manifest."""
    options.check()
    out = Path(out)
    tok = get_tokenizer()
    config = prepare_settings(sources, options, tok)
    _existing_state(out, config)  # refuse a wrong directory before touching it
    created = _first_missing(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (NotADirectoryError, FileExistsError):
        raise UserError(f"--out {out}: a part of that path is a file, not a directory: give a directory") from None
    try:
        return _prepare_locked(sources, out, options, tok, config)
    except UserError:
        # Bad input found on a first run: leave no directory whose settings would refuse the fixed
        # input. Unless it kept finished shards (below), which a rerun resumes from.
        if created is not None and not (out / PROGRESS).exists():
            _remove_empty_dirs(out, created)
        raise


def _remove_empty_dirs(out: Path, created: Path) -> None:
    """Remove `out` and its parents up to `created` while empty: our files are gone by now, and a
    run that made the directory at the same moment and took the lock first may have filled it."""
    for path in (out, *out.parents):
        try:
            path.rmdir()
        except OSError:  # not empty (the other run's dataset), or already gone
            return
        if path == created:
            return


def _first_missing(out: Path) -> Path | None:
    """The outermost directory of `out` that mkdir will create (removed again on bad input), if any."""
    missing = None
    for path in (out, *out.parents):
        if path.exists() or path.is_symlink():
            break
        missing = path
    return missing


def _prepare_locked(sources: list[Source], out: Path, options: PrepareOptions, tok: Tokenizer, config: dict) -> dict:
    with _exclusive(out):
        existing = _existing_state(out, config)  # again: another process may have finished it
        if existing is not None and "format" in existing:  # a finished dataset with equal settings
            return _reweigh(out, existing, sources)
        progress = existing or {"config": config, "sources": {s.name: new_state() for s in sources}}
        for stale in out.glob(".*.tmp-*"):  # shards an interrupted run did not finish
            stale.unlink()
        save = functools.partial(write_json_atomic, out / PROGRESS, progress)
        save()
        src = None
        try:
            for src, cap in zip(sources, config["sources"], strict=True):
                state = progress["sources"][src.name]
                if not state["done"]:
                    SourceIngest(src, state, cap, out, tok, options, save).run()
        except UserError:
            # A first run stopped by its input leaves the directory as it found it: fixed input
            # has other settings, which its progress.json would refuse. Except a hub stream cut off
            # (the network): run again, the settings are the same and its finished shards resume.
            if existing is None and not (_streamed(src) and _finished_shards(progress)):
                _remove_run_files(out, progress)
            raise
        manifest = _manifest(sources, progress, tok)
        write_json_atomic(out / MANIFEST, manifest)
        (out / PROGRESS).unlink()
    return manifest


def _streamed(src: Source | None) -> bool:
    # Not from src.identity(): that stats the source's files, and a file gone is what may have stopped it.
    return isinstance(src, HubSource) and src.files is None


def _finished_shards(progress: dict) -> int:
    return sum(len(split["shards"]) for state in progress["sources"].values() for split in state["splits"].values())


def _remove_run_files(out: Path, progress: dict) -> None:
    """Delete what a failed first run wrote into `out`: its finished shards, progress.json, the lock."""
    for state in progress["sources"].values():
        for split in state["splits"].values():
            for shard in split["shards"]:
                (out / shard["file"]).unlink(missing_ok=True)
    (out / PROGRESS).unlink(missing_ok=True)
    (out / LOCK).unlink(missing_ok=True)


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """One prepare at a time per directory: data-parallel ranks may all ask for the same cache."""
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows): concurrent runs into one --out are unsupported
        yield
        return
    with open(out / LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_settings(sources: list[Source], options: PrepareOptions, tok: Tokenizer) -> dict:
    """The settings that shape the data, as stored in the manifest's "config": equal means the same dataset."""
    def cap(src: Source) -> int | None:
        if options.max_tokens is None:
            return src.max_tokens
        return options.max_tokens or None

    entries = []
    for src in sources:
        entry = {"name": src.name, "identity": src.identity(), "max_docs": options.max_docs or None, "max_tokens": cap(src)}
        if src.split is not None:  # absent when split by hash, so configs from before --val-source compare equal
            entry["split"] = src.split
        if entry["identity"]["kind"] == "builtin" and entry["max_tokens"] is None and entry["max_docs"] is None:
            raise UserError("the builtin corpus is endless: give it a cap (--max-tokens N or --max-docs N)")
        entries.append(entry)
    return {
        "version": VERSION,
        "tokenizer": tok.identity,
        "sources": entries,
        # No share is drawn when the sources' splits are fixed (--val-source).
        "val_fraction": None if any(src.split for src in sources) else options.val_fraction,
        "shard_tokens": options.shard_tokens,
    }


def _existing_state(out: Path, config: dict) -> dict | None:
    """The manifest or progress already in `out` if it matches `config`; refuses anything else."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a directory")
    # Our lock and temp files do not count: another process may be mid-way through this very run.
    if not out.is_dir() or all(p.name == LOCK or p.name.startswith(".") and ".tmp-" in p.name for p in out.iterdir()):
        return None
    # Twice: a run in another process may replace its progress by the manifest between our reads.
    found = _read_dataset_file(out) or _read_dataset_file(out)
    if found is None:
        raise UserError(f"--out {out} is not empty and holds no tinyllm dataset: choose an empty or new directory")
    _refuse_if_different(out, found.get("config"), config)
    return found


def _read_dataset_file(out: Path) -> dict | None:
    for name in (MANIFEST, PROGRESS):
        try:
            found = read_json(out / name, "tinyllm dataset file")
        except FileNotFoundError:
            continue
        except UserError:  # damaged, if prepare wrote here (its lock); else some other program's file
            if (out / LOCK).exists():
                raise
            return None
        # Ours say what made them; a web app's manifest.json does not, and is no dataset to delete.
        return found if found.get("format") == FORMAT or "config" in found else None
    return None


def _refuse_if_different(out: Path, old: object, new: dict) -> None:
    if old == new:
        return
    if not isinstance(old, dict) or old.get("version") != new["version"]:
        raise UserError(f"{out} holds a dataset from another tinyllm version: choose a new --out or delete {out}")
    if old.get("tokenizer") != new["tokenizer"]:
        why = f"with another tokenizer ({old.get('tokenizer')})"
    elif [s.get("name") for s in old.get("sources", [])] != [s["name"] for s in new["sources"]]:
        why = f"from other sources ({', '.join(s.get('name', '?') for s in old.get('sources', []))})"
    else:
        why = "with other settings (" + ", ".join(_differences(old, new)) + ")"
    raise UserError(f"{out} already holds data prepared {why}: choose a new --out or delete {out}")


def _differences(old: dict, new: dict) -> list[str]:
    """What changed between two configs with the same sources, e.g. "builtin max_tokens 2 -> 3"."""
    changed = [f"{k} {old.get(k)} -> {new[k]}" for k in new if k != "sources" and old.get(k) != new[k]]
    for o, n in zip(old["sources"], new["sources"], strict=True):
        for k in dict.fromkeys([*n, *o]):  # both: "split" is only there for --val-source runs
            if k == "identity" and o.get(k) != n.get(k):
                changed.append(f"{n['name']} files")
            elif k == "split" and o.get(k) != n.get(k):
                changed.append(f"{n['name']} {_SPLIT_WORDS[o.get(k)]} -> {_SPLIT_WORDS[n.get(k)]}")
            elif o.get(k) != n.get(k):
                changed.append(f"{n['name']} {k} {o.get(k)} -> {n.get(k)}")
    return changed


_SPLIT_WORDS = {None: "split by hash", "train": "all train (--source with --val-source)", "val": "all val (--val-source)"}


def _reweigh(out: Path, manifest: dict, sources: list[Source]) -> dict:
    """A finished dataset asked for again: only the mixture weights may have changed."""
    changed = False
    for src in sources:
        entry = manifest["sources"][src.name]
        if (entry["weight"], entry["spec"]) != (src.weight, src.spec):
            entry["weight"], entry["spec"], changed = src.weight, src.spec, True
    if changed:
        write_json_atomic(out / MANIFEST, manifest)
    return manifest


def _manifest(sources: list[Source], progress: dict, tok: Tokenizer) -> dict:
    totals = {s: {"documents": 0, "tokens": 0, "bytes": 0} for s in SPLITS}
    entries = {}
    for src in sources:
        st = progress["sources"][src.name]
        splits = {}
        for split in SPLITS:
            sp = st["splits"][split]
            splits[split] = {"documents": sp["documents"], "tokens": sp["tokens"], "bytes": sp["bytes"], "shards": sp["shards"]}
            for key in totals[split]:
                totals[split][key] += sp[key]
        entry = {"spec": src.spec, "weight": src.weight, "splits": splits,
                 "skipped_empty": st["skipped_empty"], "replaced_utf8": st["replaced_utf8"]}
        if src.split is not None:
            entry["split"] = src.split  # every document went there: the loader reads it for that split only
        val = st["splits"]["val"]
        if val["documents"] and val["scored_documents"] == val["documents"]:
            entry["floor"] = val["nll"] / val["tokens"]  # nats/token: the best loss any model can reach
        entries[src.name] = entry
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "tinyllm": __version__,
        "tokenizer": tok.identity,
        "dtype": "uint16",
        "config": progress["config"],
        "sources": entries,
        "splits": totals,
    }
    # The val split's floor, when every source in it has one (a mix with real text has none).
    in_val = [progress["sources"][src.name]["splits"]["val"] for src in sources]
    in_val = [v for v in in_val if v["documents"]]
    if in_val and all(v["scored_documents"] == v["documents"] for v in in_val):
        manifest["floor"] = sum(v["nll"] for v in in_val) / sum(v["tokens"] for v in in_val)
    return manifest
