"""Writing files so that a crash never leaves one half-written.

Why it is shaped this way: a file a run depends on (its `config.toml`, its `metrics.jsonl` cut
back on resume, every file of a checkpoint) is either the old one or the new one, never a torn
mix. The new content goes to a temporary in the same directory (a rename is atomic only within
one filesystem), is fsynced, and `os.replace` swaps it in; the directory is fsynced after, so
the rename itself survives a power cut. A checkpoint, being a directory of files, is built in a
temporary directory with `fsync_file`/`fsync_dir` and renamed the same way (`runtime.checkpoint`).
This module imports nothing from tinyllm, so anything may use it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) in one step: a crash leaves the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_synced(tmp, text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def publish_new(tmp: str | Path, path: str | Path) -> None:
    """Give the finished file `tmp` the name `path`, which must not exist: FileExistsError if it
    does, even if it was made while `tmp` was written (a rename would have replaced it)."""
    try:
        os.link(tmp, path)  # fails if `path` exists, in one step
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links: a check, then the rename
        if os.path.lexists(path):
            raise FileExistsError(path) from None
        os.replace(tmp, path)
    else:
        os.unlink(tmp)
    fsync_dir(Path(path).parent)


def os_error_in(e: Exception) -> OSError | None:
    """The OSError an exception names only in its text ("... (os error 28)", as safetensors' Rust
    I/O errors read), so that a full disk under such a library is the one-line error it is
    everywhere else; None when it names none."""
    code = re.search(r"\(os error (\d+)\)", str(e))
    return OSError(int(code[1]), os.strerror(int(code[1]))) if code else None


def write_synced(path: str | Path, text: str) -> None:
    """Write `text` to `path` (UTF-8) and fsync it (in place: for files inside a temporary directory)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_file(path: str | Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where directories cannot be opened)."""
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
