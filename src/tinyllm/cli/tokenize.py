"""`tinyllm tokenize`: text -> ids, ids -> text, and a conversation -> ids + loss mask."""

from __future__ import annotations

import argparse
import json

from tinyllm.errors import UserError
from tinyllm.tokenizer import get_tokenizer


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenize",
        help="encode text to GPT-2 token ids (or decode ids, or render a chat)",
        description="Encode TEXT with GPT-2's BPE and print the ids as a JSON list. Special-token "
        "strings in TEXT are encoded as plain text.",
    )
    p.add_argument("text", nargs="?", help="the text to encode")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--decode", metavar="IDS", help='decode a JSON list of ids, e.g. "[15496, 995]", and print the text')
    mode.add_argument(
        "--chat",
        metavar="FILE.json",
        help='render a conversation (a JSON list of {"role", "content"} messages, roles system/user/'
        "assistant) with the ChatML template; prints ids and the assistant-token loss mask",
    )
    p.add_argument(
        "--generation-prompt",
        action="store_true",
        help="with --chat: end with '<|im_start|>assistant\\n' so a model can write the answer",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Refused, not ignored: a user who passed them expects them to change the output.
    if args.text is not None and (args.decode is not None or args.chat is not None):
        flag = "--decode" if args.decode is not None else "--chat"
        raise UserError(f"give TEXT or {flag}, not both: TEXT {args.text!r} would be ignored")
    if args.generation_prompt and args.chat is None:
        raise UserError("--generation-prompt only applies to --chat FILE.json")
    tok = get_tokenizer()
    if args.decode is not None:
        print(tok.decode(_parse_ids(args.decode)))
    elif args.chat is not None:
        messages = _read_chat(args.chat)
        try:
            rendering = tok.render_chat(messages, add_generation_prompt=args.generation_prompt)
        except UserError as e:  # a bad role or content: say which file holds it
            raise UserError(f"--chat {args.chat}: {e}") from None
        print(json.dumps({"ids": rendering.ids, "mask": rendering.mask}))
    elif args.text is not None:
        print(json.dumps(tok.encode(args.text)))
    else:
        raise UserError("give TEXT to encode, --decode IDS or --chat FILE.json")
    return 0


def _parse_ids(raw: str) -> list[int]:
    try:
        ids = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UserError(f"--decode expects a JSON list of integers like [15496, 995]: {e.msg}") from None
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise UserError("--decode expects a JSON list of integers like [15496, 995]")
    return ids


def _read_chat(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            messages = json.load(f)
    except FileNotFoundError:
        raise UserError(f"--chat {path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"--chat {path} is a directory: name a JSON file of messages") from None
    except OSError as e:  # no permission, an I/O error
        raise UserError(f"--chat {path}: cannot read it ({e.strerror or e}); make it readable") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--chat {path}: not valid UTF-8 JSON ({e})") from None
    if isinstance(messages, dict) and "messages" in messages:
        messages = messages["messages"]
    if not isinstance(messages, list):
        raise UserError(f"--chat {path}: expected a JSON list of messages (or {{\"messages\": [...]}})")
    return messages
