"""TOML in and out, for configs and presets.

Reading uses the standard library's `tomllib` (Python 3.11+) or its backport `tomli` on 3.10.
Writing is the few lines below rather than a dependency: a tinyllm config is top-level scalars
plus tables of scalars and lists of scalars, and that subset of TOML is simple to write exactly.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from tinyllm.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

TOMLDecodeError = tomllib.TOMLDecodeError
loads = tomllib.loads


def read_toml(path: str | Path) -> dict:
    """A TOML file as a dict; a file that is missing, unreadable or malformed is a UserError naming it."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"config file {path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"config file {path} is a directory: name a .toml file") from None
    except OSError as e:  # no permission, an I/O error
        raise UserError(f"cannot read config file {path} ({e.strerror or e}): make it readable") from None
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): "
                        "save it as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML: {e}") from None


def dumps(doc: dict, header: str = "") -> str:
    """`doc` as TOML: its scalar keys first, then one [table] per dict value. None is left out."""
    lines = [f"# {header}"] if header else []
    lines += [f"{k} = {value(v)}" for k, v in doc.items() if not isinstance(v, dict) and v is not None]
    for name, table in doc.items():
        if isinstance(table, dict):
            lines += ["", f"[{name}]"]
            lines += [f"{k} = {value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


def value(v: Any) -> str:
    """One TOML value: bool, int, float (inf and nan included), str, or a list of them."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b", "\f": "\\f"}


def _string(s: str) -> str:
    # A basic string: escape quotes, backslashes and every control character TOML forbids raw.
    out = (_ESCAPES.get(ch) or (f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch) for ch in s)
    return '"' + "".join(out) + '"'
