"""The `tinyllm` command: one subcommand per module in this package, each thin.

A subcommand module defines `register(subparsers)`, which adds its parser and sets
`func=run` where `run(args) -> int` parses nothing more and calls library code. `main` turns a
`UserError` into one line on stderr and exit status 2; so is an OSError that only the machine can
cause (a full disk, a read-only file system, no permission) and that names its file, wherever it
arose. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import faulthandler
import importlib
import os
import sys
import time

from tinyllm import __version__
from tinyllm.errors import EveryRankError, UserError

_RANK0_FIRST_S = 5.0  # an EveryRankError's head start for rank 0's line
# OSErrors that are the machine's state, not a mistake in tinyllm: said in one line with the file.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG}

# Subcommands in the order `tinyllm --help` lists them. A name is added here only once it works.
SUBCOMMANDS = ["tokenize", "prepare", "train", "sample", "chat", "eval", "export", "serve", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyllm",
        description="Train small GPT-style language models from scratch and talk to them.",
    )
    parser.add_argument("--version", action="version", version=f"tinyllm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"tinyllm.cli.{name}").register(sub)
    return parser


# Flags that name a file or directory. A shell expands `--out ~/x`, not `--out=~/x`: that made a
# folder named "~" here, the kind a later `rm -rf ~` cleans up with the user's home.
_PATH_FLAGS = ("out", "data", "run", "init", "config", "checkpoint", "resume", "tests")


def _expand_home(args: argparse.Namespace) -> None:
    for name in _PATH_FLAGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value.startswith("~"):
            setattr(args, name, os.path.expanduser(value))


def main(argv: list[str] | None = None) -> int:
    # A crash inside native code (torch, glibc) then prints where Python was, not nothing.
    if not faulthandler.is_enabled():
        faulthandler.enable()
    try:
        parser = build_parser()  # imports every subcommand, torch too: seconds in which Ctrl-C may come
    except KeyboardInterrupt:
        return _interrupted("tinyllm")
    args, extras = parser.parse_known_args(argv)
    if extras:
        if not hasattr(args, "stray"):
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        # A subcommand that explains stray paths (an unquoted glob) hears of all of them, not only
        # the first run: `--source a*.txt --source b*.txt` leaves two runs after the shell.
        args.stray = [*args.stray, *extras]
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _expand_home(args)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        if not isinstance(e, EveryRankError) or os.environ.get("RANK", "0") == "0":
            print(f"tinyllm {args.command}: error: {e}", file=sys.stderr)
        else:  # torchrun stops the rest once one exits: rank 0, the one that says why, goes first
            time.sleep(_RANK0_FIRST_S)
        return 2
    except BrokenPipeError:
        # The reader went away (`tinyllm eval ... | head`): stop as a tool killed by SIGPIPE would,
        # quietly; stdout goes to /dev/null so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS or not e.filename:
            raise
        print(f"tinyllm {args.command}: error: {e.filename}: {e.strerror}: free disk space or fix its permissions, "
              "then run the command again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted(f"tinyllm {args.command}")


def _interrupted(command: str) -> int:
    """Ctrl-C before a command's own handling (the trainer's) could answer it: one line, not a traceback.
    Under torchrun the launcher passed it to every process: rank 0 alone says it."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{command}: interrupted", file=sys.stderr)
    return 130
