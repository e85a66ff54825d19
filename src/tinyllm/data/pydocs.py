"""Real English that every tinyllm install already has: the documentation of Python's standard library.

Why it is shaped this way:
- A second yardstick beside the synthetic builtin corpus needs real text, and it must be built
  with no network and no extra install. The interpreter running tinyllm ships it: the
  docstrings of its standard library's modules, classes and functions, and the language
  reference's help topics (`pydoc_data.topics`, the text `help("if")` shows). Technical English,
  written by many people over thirty years; 625 documents, 2.5 M characters, 0.73 M tokens on
  CPython 3.11.
- The docstrings are read from the source files with `ast`, never by importing the modules:
  importing all of the standard library has side effects (`antigravity` opens a web browser,
  `this` prints, `tkinter` needs a display). Parsing is deterministic, so the stream is a pure
  function of the interpreter's files.
- One document per module (its docstrings in source order, each after a line naming its object,
  as `help()` lists them) and one per help topic. Modules with no docstring give no document.
  Tests (`test`, `tests`, `idle_test`) are left out, and so are the ~120 generated `encodings`
  codecs, whose docstrings are one boilerplate sentence each: near-copies would land on both
  sides of the train/val split. Installed packages (`site-packages`) are not the stdlib.
- License: the Python Software Foundation License (permissive, allows copies and derived works;
  not public domain). No Shakespeare in it.
"""

from __future__ import annotations

import ast
import hashlib
import os
import platform
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from tinyllm.data.document import Document
from tinyllm.errors import UserError

SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "encodings", "__pycache__"})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_files(root: Path | None = None) -> list[Path]:
    """The standard library's .py files, sorted by their path under `root`, tests and codecs left out."""
    root = root or stdlib_root()
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]  # pruned: site-packages may be large
        found += [Path(folder, n) for n in names if n.endswith(".py")]
    files = sorted(found, key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise UserError(f"--source python-docs: this Python's standard library sources are not at {root} "
                        "(an install without .py files): use another source")
    return files


def identity(root: Path | None = None) -> dict:
    """What fixes the text: the interpreter and its files (a hash of each one's path and size)."""
    root = root or stdlib_root()
    listing = "\n".join(f"{p.relative_to(root).as_posix()} {p.stat().st_size}" for p in module_files(root))
    return {"kind": "python-docs", "python": f"{sys.implementation.name} {platform.python_version()}",
            "files": hashlib.sha256(listing.encode()).hexdigest()}


def documents(start: int = 0, root: Path | None = None) -> Iterator[Document]:
    """Every module's docstrings, then every help topic, as Documents, from document `start` on."""
    root = root or stdlib_root()
    n = 0
    for path in module_files(root):
        text = module_text(path, _module_name(path, root))
        if text:
            if n >= start:
                yield Document(text=text)
            n += 1
    for text in _topics():
        if n >= start:
            yield Document(text=text)
        n += 1


def module_text(path: Path, name: str) -> str:
    """One module's docstrings in source order, each after a line naming its object ("" if none)."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):  # a file this interpreter cannot parse (a template): not prose
        return ""
    parts: list[str] = []

    def visit(node: ast.AST, qualname: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(child)
                if doc:
                    parts.append(f"{qualname}.{child.name}\n\n{doc}")
                visit(child, f"{qualname}.{child.name}")

    head = ast.get_docstring(tree)
    visit(tree, name)
    if not head and not parts:
        return ""
    return "\n\n".join([name, *([head] if head else []), *parts])


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _topics() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package it apart; the docstrings stand alone
        return []
    return [text.strip() for _, text in sorted(topics.items()) if text.strip()]
