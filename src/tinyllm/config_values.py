"""One config value at a time: checked against its field's type, parsed from command-line text,
or read as a duration.

Why it is shaped this way: these rules know types, not keys. `config` merges the layers and knows
which key a value is for and which layer it came from; it asks here whether the value fits, and
the error names both. Command-line text is read as a TOML value, so `--set` accepts what a config
file would, and a string field takes the text as typed unless it is quoted TOML (`""` for empty).
Only the types the config dataclasses use are supported: bool, int, float, str, Literal, list.
"""

from __future__ import annotations

import json
import re
import typing
from typing import Any, Literal

from tinyllm import tomlio
from tinyllm.errors import UserError


def coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check `value` against a field's type hint; a command-line string is parsed first."""
    if isinstance(value, str) and source.startswith("--"):
        parsed = _parse_cli_value(value)
        # A string field takes the text as typed, unless it was quoted TOML ("" for empty).
        value = parsed if isinstance(parsed, str) or not (hint is str or _accepts_str(hint)) else value
    ok, out = _check(value, hint)
    if not ok:
        raise UserError(f"{source}: {key} must be {_describe(hint)}, got {value!r}")
    return out


def _parse_cli_value(raw: str) -> Any:
    try:
        return tomlio.loads(f"v = {raw}")["v"]
    except tomlio.TOMLDecodeError:
        return raw


def _accepts_str(hint: Any) -> bool:
    if typing.get_origin(hint) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(hint))
    return False


def _check(value: Any, hint: Any) -> tuple[bool, Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if origin is Literal:
        return value in args and type(value) in {type(a) for a in args}, value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        checked = [_check(v, args[0]) for v in value]
        return all(ok for ok, _ in checked), [v for _, v in checked]
    raise AssertionError(f"config type {hint!r} is not supported")


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, what: str = "duration") -> float:
    """'90s', '10m', '2h', '1h30m', '1.5h' or plain seconds -> seconds."""
    s = text.strip().lower().replace(" ", "")
    parts = list(_DURATION.finditer(s))
    if not s or not parts or "".join(p.group(0) for p in parts) != s:
        raise UserError(f"{what}: cannot read {text!r} as a duration: use e.g. 90s, 10m, 2h or 1h30m")
    seconds = sum(float(p.group(1)) * _UNIT_SECONDS[p.group(2)] for p in parts)
    if seconds <= 0:
        raise UserError(f"{what}: the duration {text!r} must be positive")
    return seconds
